"""Dense int4/int8 linear layer y = x W^T (+ bias) for attention projections and shared experts.

Below configs.DEQUANT_MIN_ROWS rows the Triton GEMM runs on the packed weights; from there on the
weights are dequantized once per call and cuBLAS (F.linear) runs the compute-bound GEMM.
"""

import torch
import torch.nn.functional as F

from . import _qgemm
from .configs import DEQUANT_MIN_ROWS, GemmConfig, get_config, use_dequant
from .dequant import dequantize_packed
from .fused_moe import device_info
from .packing import ACT_DTYPES, PackedExperts, dequantize


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
                 config: GemmConfig | None = None, path: str = "auto") -> torch.Tensor:
    """x [..., K] fp16/bf16, w from pack_linear ([N, K]), bias [N] or None -> [..., N] in x's dtype.
    path: "auto" (the dequant path from DEQUANT_MIN_ROWS rows), "kernel" or "dequant"; config
    overrides the Triton GEMM's launch config."""
    _check(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k).contiguous()
    M = x2.shape[0]
    name, sms = device_info(x.device)
    if use_dequant(path, DEQUANT_MIN_ROWS, name, M):
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x2, dequantize_packed(w, x.dtype)[0], b).reshape(*lead, w.n)
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
