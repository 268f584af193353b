"""Dequantize PackedExperts to fp16/bf16 weights, for the vendor-GEMM paths at many rows.

At many rows a GEMM is compute-bound and the Triton GEMMs lose to cuBLAS; dequantizing the weights
once per call (a memory-bound pass) and handing them to cuBLAS or torch._grouped_mm wins, as in
vLLM's AWQ path. Where that happens is data: configs.DEQUANT_MIN_ROWS*.
"""

import torch
import triton
import triton.language as tl

from ._qgemm import block_k_for
from .packing import (
    ACT_DTYPES, PackedExperts, k_tile_offset, kernel_words, load_scale_zero, slice_k_offsets, unpack_offset,
    unpack_slice, weight_tile_ptrs,
)

BLOCK_N = 64
BLOCK_K = 128  # lowered by block_k_for so that each slice of a K tile lies in one group


@triton.jit
def _dequant_kernel(
    # pointers
    w_ptr, s_ptr, z_ptr, out_ptr,
    # sizes
    N, K, first_expert,
    # strides (the last dimension of every tensor is contiguous)
    stride_we, stride_wt, stride_se, stride_sg, stride_oe, stride_on,
    # constexpr
    BITS: tl.constexpr, GROUP_K: tl.constexpr, OFFSET: tl.constexpr, ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UNPACK_ASM: tl.constexpr,
):
    # W: kernel_words(packed) (tiles of TILE_N rows x TILE_K k)   s, z: [E, Gp, N]
    # out: [E', N, K], expert first_expert + e
    # out = DT((q - z) * s), computed in fp32: q - z and its product with an fp16 scale are exact there,
    # so the only rounding is the final cast (bitwise what packing.dequantize(...).to(DT) gives).
    # GROUP_K: group size, 0 for per-channel; OFFSET: see packing.unpack_offset; ZERO: see load_scale_zero
    DT: tl.constexpr = out_ptr.dtype.element_ty
    SLICES: tl.constexpr = 4 if BITS == 4 else 1
    e = tl.program_id(0)
    expert = (first_expert + e).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k0 = tl.program_id(2) * BLOCK_K
    # K is padded to a multiple of every BLOCK_K in packed storage: the word tile never needs a K mask
    w_ptrs = weight_tile_ptrs(w_ptr + expert * stride_we, offs_n, stride_wt, BITS, BLOCK_K) + k_tile_offset(k0, BITS)
    raw = tl.load(w_ptrs, mask=n_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K / slices]
    s_ptrs = s_ptr + expert * stride_se + offs_n
    z_ptrs = z_ptr + expert * stride_se + offs_n
    if GROUP_K == 0:
        s, zo = load_scale_zero(s_ptrs, z_ptrs, n_mask, OFFSET, ZERO)
    out_rows = out_ptr + e.to(tl.int64) * stride_oe + offs_n[:, None] * stride_on
    for sl in tl.static_range(SLICES):
        if GROUP_K != 0:
            if sl * 16 % GROUP_K == 0:  # the slices of one group share its scales (groups of 32: slices 0-1, 2-3)
                g = (k0 + sl * 16) // GROUP_K
                s, zo = load_scale_zero(s_ptrs + g * stride_sg, z_ptrs + g * stride_sg, n_mask, OFFSET, ZERO)
        w = (unpack_slice(raw, sl, BITS, DT, UNPACK_ASM).to(tl.float32) - zo[:, None]) * s[:, None]
        ks = slice_k_offsets(k0, BITS, sl, BLOCK_K)
        tl.store(out_rows + ks[None, :], w.to(DT), mask=n_mask[:, None] & (ks[None, :] < K))


def _expert_range(experts, num_experts: int) -> range:
    if isinstance(experts, tuple):
        experts = slice(*experts)
    if not isinstance(experts, slice):
        raise TypeError(f"experts must be a slice or an (e0, e1) tuple, got {type(experts).__name__}")
    r = range(num_experts)[experts]
    if r.step != 1:
        raise ValueError(f"experts must be a contiguous range (step 1), got {experts}")
    return r


def dequantize_packed(packed: PackedExperts, dtype: torch.dtype, experts: slice | tuple[int, int] = slice(None),
                      *, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [E', N, K] in dtype (float16/bfloat16) for the experts in range `experts`, rows in the packed
    order (gate_up: gate_0, up_0, gate_1, ...; split columns 0::2 / 1::2), K unpadded.
    Equals packing.dequantize(packed) cast to dtype (which gives gate_up rows un-interleaved).
    out: a [E', N, K] buffer of dtype on packed's device, last dimension contiguous, to write into."""
    if dtype not in ACT_DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    r = _expert_range(experts, packed.num_experts)
    shape = (len(r), packed.n, packed.k)
    device = packed.qweight.device
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"out must be {dtype} {shape} on {device} with a contiguous last dimension, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}")
    if out.numel() == 0:
        return out
    block_k = block_k_for(packed.group_size, packed.per_channel, packed.bits, BLOCK_K)
    grid = (len(r), -(-packed.n // BLOCK_N), -(-packed.k // block_k))
    words = kernel_words(packed)
    _dequant_kernel[grid](
        words, packed.scales, packed.zeros, out,
        packed.n, packed.k, r.start,
        words.stride(0), words.stride(1), packed.scales.stride(0), packed.scales.stride(1),
        out.stride(0), out.stride(1),
        BITS=packed.bits, GROUP_K=0 if packed.per_channel else packed.group_size,
        OFFSET=unpack_offset(packed.bits, dtype), ZERO=packed.kernel_zero, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        UNPACK_ASM=out.is_cuda,
    )
    return out
