"""Load-time repacking of quantized expert weights into the layout the GEMM kernels read.

Input (moeq's quantizer output, per expert weight):
    q      uint8   [E, N, K]  unsigned integers in [0, 2**bits - 1]
    scales float16 [E, N, G]  G = ceil(K / group_size); G == 1 means per-channel
    zeros  uint8   [E, N, G]  symmetric checkpoints hold 2**(bits - 1) everywhere
    W[e, n, k] = (q - zeros[e, n, k // gs]) * scales[e, n, k // gs]

Packed layout (`PackedExperts`), built once at load time, never per call:
    qweight int32   [E, N, Kp // P]  P = 32 // bits values per word, K-contiguous: word j of row n
                                     holds k = j * P + i in bits [i * bits, (i + 1) * bits).
                                     A [BLOCK_N, BLOCK_K] tile is BLOCK_N runs of BLOCK_K / 2
                                     (int4) contiguous bytes, read with 16-byte loads.
    scales  float16 [E, Gp, N]       N-contiguous so a tile's scales are one coalesced row per group
    zeros   uint8   [E, Gp, N]
K is padded to Kp, a multiple of K_ALIGN, with q = zeros = scales = 0, so padded weights are exactly
zero and the kernels never mask weight loads along K (only the activations, which stop at K).
With `gate_up=True` the rows of a fused w13 [E, 2I, H] (gate rows 0..I-1, up rows I..2I-1) are
interleaved (gate_0, up_0, gate_1, up_1, ...), so one output tile holds matching gate and up columns
and SiLU(gate) * up is computed in the GEMM epilogue.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# K is padded to a multiple of this, the largest BLOCK_K a config may use.
K_ALIGN = 256
SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class PackedExperts:
    """Quantized weights of E experts (E == 1 for a dense linear layer), in kernel layout."""

    qweight: torch.Tensor  # int32   [E, N, Kp // (32 // bits)]
    scales: torch.Tensor  # float16 [E, Gp, N]
    zeros: torch.Tensor  # uint8   [E, Gp, N]
    bits: int
    group_size: int  # == k for per-channel
    k: int  # unpadded reduction size
    gate_up: bool = False  # rows interleaved gate/up (see module docstring)

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    @property
    def k_padded(self) -> int:
        return self.qweight.shape[2] * (32 // self.bits)

    @property
    def per_channel(self) -> bool:
        return self.group_size >= self.k


def _check_quantized(q, scales, zeros, bits, group_size):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if q.dim() != 3 or q.dtype != torch.uint8:
        raise ValueError(f"q must be uint8 [E, N, K], got {q.dtype} {tuple(q.shape)}")
    E, N, K = q.shape
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    G = -(-K // group_size) if group_size < K else 1
    for name, t, dtype in (("scales", scales, torch.float16), ("zeros", zeros, torch.uint8)):
        if t.dtype != dtype or tuple(t.shape) != (E, N, G):
            raise ValueError(
                f"{name} must be {dtype} [E, N, G] = {(E, N, G)} for K={K}, group_size={group_size}; "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if int(q.max()) >= 1 << bits or int(zeros.max()) >= 1 << bits:
        raise ValueError(f"q and zeros must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    if G > 1 and group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two (or >= K for per-channel), got {group_size}")
    return E, N, K, G


def _interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] gate rows then up rows -> rows (gate_0, up_0, gate_1, up_1, ...)."""
    E, N = t.shape[:2]
    if N % 2:
        raise ValueError(f"gate_up weights need an even number of rows, got {N}")
    return t.reshape(E, 2, N // 2, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


def _deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    E, N = t.shape[:2]
    return t.reshape(E, N // 2, 2, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


def pack_experts(q, scales, zeros, bits: int, group_size: int, *, gate_up: bool = False) -> PackedExperts:
    """Repack q [E, N, K], scales/zeros [E, N, G] into the kernel layout; gate_up interleaves w13 rows."""
    E, N, K, G = _check_quantized(q, scales, zeros, bits, group_size)
    if G == 1:
        group_size = K
    if gate_up:
        q, scales, zeros = _interleave_rows(q), _interleave_rows(scales), _interleave_rows(zeros)
    P = 32 // bits
    Kp = -(-K // K_ALIGN) * K_ALIGN
    qp = torch.zeros(E, N, Kp, dtype=torch.int32, device=q.device)
    qp[:, :, :K] = q.to(torch.int32)
    # word j holds values j*P + i at bit offset i*bits (shift-and-or in int64, then reinterpret)
    shifts = torch.arange(P, device=q.device, dtype=torch.int64) * bits
    words = (qp.reshape(E, N, Kp // P, P).to(torch.int64) << shifts).sum(-1)
    qweight = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    Gp = 1 if G == 1 else -(-Kp // group_size)
    sp = torch.zeros(E, Gp, N, dtype=torch.float16, device=q.device)
    zp = torch.zeros(E, Gp, N, dtype=torch.uint8, device=q.device)
    sp[:, :G] = scales.transpose(1, 2)
    zp[:, :G] = zeros.transpose(1, 2)
    return PackedExperts(qweight.contiguous(), sp.contiguous(), zp.contiguous(), bits, group_size, K, gate_up)


def pack_linear(q, scales, zeros, bits: int, group_size: int) -> PackedExperts:
    """Repack a dense layer's q [N, K], scales/zeros [N, G] as a one-expert PackedExperts."""
    return pack_experts(q[None], scales[None], zeros[None], bits, group_size)


def unpack_q(packed: PackedExperts) -> torch.Tensor:
    """The stored integers back as uint8 [E, N, K], in the original row order (exact inverse of packing)."""
    P = 32 // packed.bits
    shifts = torch.arange(P, device=packed.qweight.device, dtype=torch.int32) * packed.bits
    q = (packed.qweight[..., None] >> shifts) & ((1 << packed.bits) - 1)  # [E, N, Kp // P, P]
    q = q.reshape(packed.num_experts, packed.n, -1)[:, :, : packed.k].to(torch.uint8)
    return _deinterleave_rows(q) if packed.gate_up else q


def dequantize(packed: PackedExperts) -> torch.Tensor:
    """fp32 W [E, N, K] in the original row order: (q - zeros[k // gs]) * scales[k // gs]."""
    q = packed.qweight
    P = 32 // packed.bits
    shifts = torch.arange(P, device=q.device, dtype=torch.int32) * packed.bits
    qv = ((q[..., None] >> shifts) & ((1 << packed.bits) - 1)).reshape(q.shape[0], q.shape[1], -1)
    qv = qv[:, :, : packed.k].float()
    g = torch.arange(packed.k, device=q.device) // packed.group_size  # [K]
    s = packed.scales.float().transpose(1, 2)[:, :, g]  # [E, N, K]
    z = packed.zeros.float().transpose(1, 2)[:, :, g]
    w = (qv - z) * s
    return _deinterleave_rows(w) if packed.gate_up else w


@triton.jit
def load_dequant_tile(
    w_base, s_base, z_base,  # pointers: this expert's qweight, scales, zeros
    offs_n, n_mask, k0,  # [BLOCK_N] rows, their mask, first k of the tile (multiple of BLOCK_K)
    stride_wn, stride_sg,
    BITS: tl.constexpr, GROUP_K: tl.constexpr, GROUP_TILE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Read one [BLOCK_K, BLOCK_N] tile of W^T from the packed layout and dequantize it to fp32.

    GROUP_K is the group size (Kp for per-channel); GROUP_TILE = min(GROUP_K, BLOCK_K), so a tile
    spans BLOCK_K // GROUP_TILE groups. Each packed word is loaded once (no duplicated addresses)
    and split into its values in registers.
    """
    PACK: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // PACK
    NG: tl.constexpr = BLOCK_K // GROUP_TILE
    offs_kw = k0 // PACK + tl.arange(0, KW)
    words = tl.load(w_base + offs_n[:, None] * stride_wn + offs_kw[None, :], mask=n_mask[:, None], other=0)
    shifts = tl.arange(0, PACK) * BITS
    q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BN, KW, PACK]
    # exact int -> float without a conversion instruction: put q in the mantissa of 2**23, subtract 2**23
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    g = (k0 + tl.arange(0, NG) * GROUP_TILE) // GROUP_K
    sz_offs = g[None, :] * stride_sg + offs_n[:, None]  # [BN, NG]
    s = tl.load(s_base + sz_offs, mask=n_mask[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_base + sz_offs, mask=n_mask[:, None], other=0).to(tl.float32)
    w = tl.reshape(qf, (BLOCK_N, NG, GROUP_TILE))
    w = (w - z[:, :, None]) * s[:, :, None]
    return tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))
