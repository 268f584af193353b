"""Fused MoE block with int4/int8 expert weights: out = sum_j w_j * down_e(SiLU(gate_e(x)) * up_e(x)).

Kernel path: two grouped GEMMs over the experts, each one launch of _qgemm_kernel:
  1. gate/up: rows of the same expert share a program; SiLU(gate) * up in the epilogue -> h [T*k, I]
  2. down: h @ w2^T scaled by the routing weight and atomically summed over the top-k -> fp32 [T, H]
Dequant path, from configs.DEQUANT_MIN_ROWS_PER_EXPERT rows per expert (prefill), where those GEMMs
are compute-bound and lose to the vendor's: the (token, slot) pairs are sorted by expert, the weights
dequantized to the activation dtype once per call (a contiguous range of experts at a time, within
configs.DEQUANT_SCRATCH_BYTES), and torch._grouped_mm runs both GEMMs.
"""

import functools

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from . import _qgemm
from .configs import DEQUANT_MIN_ROWS_PER_EXPERT, GemmConfig, dequant_chunk_experts, get_config, use_dequant
from .dequant import dequantize_packed
from .moe_routing import max_blocks, moe_align_block_size
from .packing import ACT_DTYPES, PackedExperts, dequantize

# torch._grouped_mm runs on the CPU from torch 2.9 (2.8 has no CPU kernel), its sync-free CUTLASS kernel
# on sm90/sm100 only for bfloat16
_GROUPED_MM = hasattr(torch, "_grouped_mm") and TorchVersion(torch.__version__) >= (2, 9)


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
    path: str = "auto",
) -> torch.Tensor:
    """MoE block output [T, H] in hidden's dtype. hidden [T, H]; w13 [E, 2I, H] (gate_up=True);
    w2 [E, H, I]; topk_ids/topk_weights [T, k]; ids outside [0, E) are dropped. configs overrides the
    (gate/up, down) launch configs; path: "auto" (the dequant path from DEQUANT_MIN_ROWS_PER_EXPERT
    rows per expert), "kernel" or "dequant"."""
    T, H, E, I, k = _check(hidden, w13, w2, topk_ids, topk_weights)
    hidden = hidden.contiguous()
    name, sms = device_info(hidden.device)
    if use_dequant(path, DEQUANT_MIN_ROWS_PER_EXPERT, name, T * k / E):
        return _fused_moe_dequant(hidden, w13, w2, topk_ids, topk_weights)
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


def _grouped_mm_runs(x: torch.Tensor) -> bool:
    # torch._grouped_mm needs 16-byte-aligned row strides (K % 8 for 16-bit types) on every device; for
    # float16 or on other GPUs it is a loop over the groups with a host sync, like _grouped_linear's own
    if not _GROUPED_MM or x.dtype != torch.bfloat16 or x.shape[1] % 8:
        return False
    return x.device.type == "cpu" or torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Row group g of x times w[g]^T. x [R, K] with the rows of group g at offs[g-1]:offs[g] (offs int32 [G],
    offs[-1] <= R), w [G, N, K] -> [R, N] in x's dtype; rows from offs[-1] on are left undefined."""
    if _grouped_mm_runs(x):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    y = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        torch.mm(x[start:end], w[g].T, out=y[start:end])
        start = end
    return y


def _fused_moe_dequant(hidden, w13, w2, topk_ids, topk_weights):
    """fused_moe's dequant path (see the module docstring); arguments checked by fused_moe."""
    # pairs p = t * k + j, sorted by expert: row r of the sorted order is pair order[r]
    T, k = topk_ids.shape
    E, H, I = w13.num_experts, w13.k, w2.k
    P, dt, dev = T * k, hidden.dtype, hidden.device
    ids = topk_ids.reshape(-1)
    valid = (ids >= 0) & (ids < E)
    key = torch.where(valid, ids, E)  # dropped pairs sort last, past offs[-1]
    order = torch.argsort(key, stable=True)
    # offs[e]: end of expert e's rows, from a search of the sorted ids (bincount would sync with the host)
    offs = torch.searchsorted(key[order], torch.arange(E, device=dev), right=True).to(torch.int32)  # [E]
    tok = torch.div(order, k, rounding_mode="floor")  # [P] token of each sorted row
    dest = torch.where(valid[order], tok, T)  # dropped pairs add into a spare output row T
    weight = topk_weights.reshape(-1)[order].float()  # [P]
    out = torch.zeros(T + 1, H, dtype=torch.float32, device=dev)

    # experts e0:e0+step at a time; the scratch holds a range's w13 [2I, H] each, then its w2 [H, I] each
    step = dequant_chunk_experts(2 * I * H * dt.itemsize)
    starts = list(range(0, E, step))
    # rows of each range; one range takes all P rows (its dropped pairs' too) and needs no host sync
    bounds = [0, P] if len(starts) == 1 else [0] + offs[[e1 - 1 for e1 in starts[1:] + [E]]].tolist()
    scratch = torch.empty(min(step, E) * 2 * I * H, dtype=dt, device=dev)
    for e0, r0, r1 in zip(starts, bounds[:-1], bounds[1:]):
        if r1 == r0:
            continue
        e1 = min(e0 + step, E)
        ne = e1 - e0
        offs_c = offs[e0:e1] - r0  # this range's rows r0:r1 are rows 0:R of its GEMMs
        W13 = dequantize_packed(w13, dt, (e0, e1), out=scratch[: ne * 2 * I * H].view(ne, 2 * I, H))
        gu = _grouped_linear(hidden[tok[r0:r1]], W13, offs_c)  # [R, 2I], gate/up columns interleaved
        h = F.silu(gu[:, 0::2]) * gu[:, 1::2]  # [R, I]
        W2 = dequantize_packed(w2, dt, (e0, e1), out=scratch[: ne * H * I].view(ne, H, I))
        y = _grouped_linear(h, W2, offs_c)  # [R, H]
        out.index_add_(0, dest[r0:r1], y.float() * weight[r0:r1, None])
    return out[:T].to(dt)


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
