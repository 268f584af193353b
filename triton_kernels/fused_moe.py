"""Fused MoE block with int4/int8 expert weights: out = sum_j w_j * down_e(SiLU(gate_e(x)) * up_e(x)).

Two grouped GEMMs over the experts, each one launch of _qgemm_kernel:
  1. gate/up: rows of the same expert share a program; SiLU(gate) * up in the epilogue -> h [T*k, I]
  2. down: h @ w2^T scaled by the routing weight and atomically summed over the top-k -> fp32 [T, H]
"""

import functools

import torch

from . import _qgemm
from .configs import GemmConfig, get_config
from .moe_routing import max_blocks, moe_align_block_size
from .packing import PackedExperts, dequantize

ACT_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def device_info(device: torch.device) -> tuple[str, int]:
    """(name, SM count) used to key tuned configs; the interpreter runs on 'cpu'."""
    if device.type != "cuda":
        return "cpu", 132
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _check(hidden, w13, w2, topk_ids, topk_weights):
    if hidden.dim() != 2 or hidden.dtype not in ACT_DTYPES:
        raise ValueError(f"hidden must be float16/bfloat16 [T, H], got {hidden.dtype} {tuple(hidden.shape)}")
    T, H = hidden.shape
    if not isinstance(w13, PackedExperts) or not isinstance(w2, PackedExperts):
        raise TypeError("w13 and w2 must be PackedExperts (see triton_kernels.packing.pack_experts)")
    if not w13.gate_up:
        raise ValueError("w13 must be packed with pack_experts(..., gate_up=True)")
    E, I = w13.num_experts, w13.n // 2
    if w13.k != H:
        raise ValueError(f"w13 is [E, 2I, H] = [{E}, {w13.n}, {w13.k}] but hidden has H={H}")
    if (w2.num_experts, w2.n, w2.k) != (E, H, I):
        raise ValueError(f"w2 must be [E, H, I] = {(E, H, I)}, got {(w2.num_experts, w2.n, w2.k)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [T={T}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be float {tuple(topk_ids.shape)}, got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    devices = {t.device for t in (hidden, w13.qweight, w2.qweight, topk_ids, topk_weights)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    return T, H, E, I, topk_ids.shape[1]


def fused_moe(
    hidden: torch.Tensor,
    w13: PackedExperts,
    w2: PackedExperts,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    configs: tuple[GemmConfig, GemmConfig] | None = None,
) -> torch.Tensor:
    """MoE block output [T, H] in hidden's dtype. hidden [T, H]; w13 [E, 2I, H] (gate_up=True);
    w2 [E, H, I]; topk_ids/topk_weights [T, k]. configs overrides (gate/up, down) launch configs."""
    T, H, E, I, k = _check(hidden, w13, w2, topk_ids, topk_weights)
    hidden = hidden.contiguous()
    name, sms = device_info(hidden.device)
    if configs is None:
        cfg13 = get_config(name, E, w13.n, H, w13.bits, T, k, sms, splittable=False)
        cfg2 = get_config(name, E, H, I, w2.bits, T, k, sms)
    else:
        cfg13, cfg2 = configs
    if cfg13.split_k != 1:
        raise ValueError("the gate/up GEMM applies SiLU in its epilogue and cannot use split_k > 1")
    P = T * k
    routings = {bm: moe_align_block_size(topk_ids, E, bm) for bm in {cfg13.block_m, cfg2.block_m}}
    weights = topk_weights.reshape(-1).contiguous()

    h = torch.empty(P, I, dtype=hidden.dtype, device=hidden.device)
    _qgemm.launch(
        hidden, w13, h, cfg13, num_rows=P, num_m_blocks=max_blocks(P, E, cfg13.block_m),
        epilogue=_qgemm.EPILOGUE_SILU_MUL, a_div=k, routing=routings[cfg13.block_m],
    )
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    _qgemm.launch(
        h, w2, out, cfg2, num_rows=P, num_m_blocks=max_blocks(P, E, cfg2.block_m),
        epilogue=_qgemm.EPILOGUE_WEIGHTED_SUM, c_div=k, topk_weights=weights, routing=routings[cfg2.block_m],
    )
    return out.to(hidden.dtype)


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: PackedExperts,
    w2: PackedExperts,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Torch twin of fused_moe, the reference: dequantize, loop over experts, all in fp32. Returns fp32 [T, H]."""
    T, H, E, I, k = _check(hidden, w13, w2, topk_ids, topk_weights)
    x = hidden.float()
    W13, W2 = dequantize(w13), dequantize(w2)  # [E, 2I, H], [E, H, I]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    for e in range(E):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ W13[e].T
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        out.index_add_(0, tok, (h @ W2[e].T) * topk_weights[tok, slot, None].float())
    return out
