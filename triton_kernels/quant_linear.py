"""Dense int4/int8 linear layer y = x W^T (+ bias) for attention projections and shared experts."""

import torch

from . import _qgemm
from .configs import GemmConfig, get_config
from .fused_moe import ACT_DTYPES, device_info
from .packing import PackedExperts, dequantize


def _check(x, w, bias):
    if x.dtype not in ACT_DTYPES or x.dim() < 1:
        raise ValueError(f"x must be float16/bfloat16 [..., K], got {x.dtype} {tuple(x.shape)}")
    if not isinstance(w, PackedExperts) or w.num_experts != 1 or w.gate_up:
        raise ValueError("w must be a one-expert PackedExperts from pack_linear")
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]} but w is [N, K] = [{w.n}, {w.k}]")
    if bias is not None and (bias.shape != (w.n,) or bias.device != x.device):
        raise ValueError(f"bias must be [N={w.n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if x.device != w.qweight.device:
        raise ValueError(f"x is on {x.device} but w on {w.qweight.device}")


def quant_linear(x: torch.Tensor, w: PackedExperts, bias: torch.Tensor | None = None, *,
                 config: GemmConfig | None = None) -> torch.Tensor:
    """x [..., K] fp16/bf16, w from pack_linear ([N, K]), bias [N] or None -> [..., N] in x's dtype."""
    _check(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k).contiguous()
    M = x2.shape[0]
    name, sms = device_info(x.device)
    cfg = config or get_config(name, 1, w.n, w.k, w.bits, M, 1, sms)
    split = cfg.split_k > 1
    y = (torch.zeros if split else torch.empty)(M, w.n, dtype=torch.float32 if split else x.dtype, device=x.device)
    _qgemm.launch(
        x2, w, y, cfg, num_rows=M, num_m_blocks=-(-M // cfg.block_m),
        epilogue=_qgemm.EPILOGUE_STORE, bias=bias,
    )
    return y.to(x.dtype).reshape(*lead, w.n)


def quant_linear_torch(x: torch.Tensor, w: PackedExperts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of quant_linear, the reference: dequantize, fp32 matmul. Returns fp32 [..., N]."""
    _check(x, w, bias)
    y = x.float() @ dequantize(w)[0].T
    return y + bias.float() if bias is not None else y
