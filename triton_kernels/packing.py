"""Load-time repacking of quantized expert weights into the layout the GEMM kernels read.

Input (moeq's quantizer output, per expert weight):
    q      uint8   [E, N, K]  unsigned integers in [0, 2**bits - 1]
    scales float16 [E, N, G]  G = ceil(K / group_size); G == 1 means per-channel
    zeros  uint8   [E, N, G]  symmetric checkpoints hold 2**(bits - 1) everywhere
    W[e, n, k] = (q - zeros[e, n, k // gs]) * scales[e, n, k // gs]

Packed layout (`PackedExperts`), built once at load time, never per call:
    qweight uint8   [E, Np / TILE_N, Kp / TILE_K, TILE_N, TILE_K * bits / 8]
                                           tiles of TILE_N rows x TILE_K k, each contiguous (8 KB int4,
                                           16 KB int8), rows padded to Np with zeros. A row of a tile is
                                           K-contiguous bytes (`packed_rows` gives the [E, N, Kp * bits / 8]
                                           view). int8: byte k holds k. int4: in each chunk of 64 k, the
                                           little-endian 16-bit word j (j < 16) holds k = j + 16 s in its
                                           bits 4s..4s+3 (s = 0..3), so byte 2j holds k = j, j + 16 and
                                           byte 2j + 1 k = j + 32, j + 48.
    scales  float16 [E, Gp, N]             N-contiguous: a tile's scales are one coalesced row
    zeros   uint8   [E, Gp, N]
Why this int4 order: the GEMM reads a K tile as 16-bit words and takes it apart into four slices, slice s
being nibble s of every word, with elementwise integer ops only (shift, mask, OR with the exponent of a
float: no reshapes); each slice is a plain [rows, 16-k runs] operand of its own dot, whose activations
are contiguous runs of 16 k. Because the dequantization is elementwise, Triton stages the packed words in
shared memory and unpacks them in registers, in the layout of the MMA operand; a reshape or join before
the MMA operand's layout would instead send the 4x larger bf16 tile through shared memory, which measured as
the bottleneck (L1 at 84%, DRAM at 22%) on an H100. `join_slices` joins them only where the dequantized
tile is the shared-memory operand of the MMA anyway (prefill tiles without swap). A register of the MMA
operand holds two neighbouring words, so on the GPU one 32-bit shift and one LOP3 give two weights
(`unpack_slice`); a byte layout needed twice the instructions.
Why tiles: a GEMM program streams one 128-row block of weights along K, and a row-major [N, K] array
served each of its K tiles as 128 runs of 64 bytes 2 to 7 KB apart. Read the same way, tile-major storage
(each K tile one run) streamed 1.2-1.45x faster on an H100 (run 35 of benchmarks/kernels_v2_h100.txt), and
the fused MoE block decoded 1.04-1.27x faster with the same configs (run 36).
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

# K is padded to a multiple of this, itself a multiple of TILE_K (which is all the tiles need; 256 is from
# before them, when it was the largest BLOCK_K).
K_ALIGN = 256
# Rows and k of a stored weight tile; a GEMM's BLOCK_K may not exceed TILE_K (its K tile lies in one stored tile).
TILE_N = 128
TILE_K = 128
_TILE_N = tl.constexpr(TILE_N)
_TILE_K = tl.constexpr(TILE_K)
SUPPORTED_BITS = (4, 8)
ACT_DTYPES = (torch.float16, torch.bfloat16)  # the activation (and dequantized weight) dtypes


@dataclass(frozen=True)
class PackedExperts:
    """Quantized weights of E experts (E == 1 for a dense linear layer), in kernel layout."""

    qweight: torch.Tensor  # uint8   [E, Np / TILE_N, Kp / TILE_K, TILE_N, TILE_K * bits // 8]
    scales: torch.Tensor  # float16 [E, Gp, N]
    zeros: torch.Tensor  # uint8   [E, Gp, N]
    bits: int
    group_size: int  # == k for per-channel
    k: int  # unpadded reduction size
    n: int  # unpadded rows
    gate_up: bool = False  # rows interleaved gate/up (see module docstring)
    symmetric: bool = False  # every zero point is 2**(bits - 1): the kernels use the constant, not the zeros

    @property
    def kernel_zero(self) -> int:
        """The ZERO constexpr of load_scale_zero: the constant zero point, or -1 (load the zeros)."""
        return 1 << (self.bits - 1) if self.symmetric else -1

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def k_padded(self) -> int:
        return self.qweight.shape[2] * TILE_K

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
        scales, zeros = _interleave_rows(scales), _interleave_rows(zeros)
    Kp = -(-K // K_ALIGN) * K_ALIGN
    Np = -(-N // TILE_N) * TILE_N
    row_bytes = TILE_K * bits // 8
    qweight = torch.empty(E, Np // TILE_N, Kp // TILE_K, TILE_N, row_bytes, dtype=torch.uint8, device=q.device)
    step = max(1, (1 << 28) // (Np * Kp))  # experts per chunk: bounds the temporaries at 256 MB
    for e0 in range(0, E, step):
        qc = q[e0 : e0 + step]
        qc = _interleave_rows(qc) if gate_up else qc
        e = qc.shape[0]
        qp = torch.zeros(e, Np, Kp, dtype=torch.uint8, device=q.device)
        qp[:, :N, :K] = qc
        if bits == 4:  # [.., chunk, slice s, j] -> byte 2j from slices 0 and 1, byte 2j + 1 from 2 and 3
            sl = qp.reshape(e, Np, Kp // 64, 4, 16)
            pairs = (sl[:, :, :, 0::2] | (sl[:, :, :, 1::2] << 4))  # [.., chunk, byte of the word, j]
            qp = pairs.transpose(-1, -2).reshape(e, Np, Kp // 2)
        # [e, Np, Kp bytes] -> [e, row tile, k tile, row, byte]
        qweight[e0 : e0 + step] = qp.reshape(e, Np // TILE_N, TILE_N, Kp // TILE_K, row_bytes).transpose(2, 3)
    Gp = 1 if G == 1 else -(-Kp // group_size)
    sp = torch.zeros(E, Gp, N, dtype=torch.float16, device=q.device)
    zp = torch.zeros(E, Gp, N, dtype=torch.uint8, device=q.device)
    sp[:, :G] = scales.transpose(1, 2)
    zp[:, :G] = zeros.transpose(1, 2)
    symmetric = bool((zeros == 1 << (bits - 1)).all())
    return PackedExperts(qweight, sp.contiguous(), zp.contiguous(), bits, group_size, K, N, gate_up, symmetric)


def pack_linear(q, scales, zeros, bits: int, group_size: int) -> PackedExperts:
    """Repack a dense layer's q [N, K], scales/zeros [N, G] as a one-expert PackedExperts."""
    return pack_experts(q[None], scales[None], zeros[None], bits, group_size)


def packed_rows(packed: PackedExperts) -> torch.Tensor:
    """qweight as rows: uint8 [E, N, Kp * bits // 8] (a copy), row n holding the bytes of packed row n."""
    E, row_tiles, k_tiles, rows, row_bytes = packed.qweight.shape
    rows = packed.qweight.transpose(2, 3).reshape(E, row_tiles * rows, k_tiles * row_bytes)
    return rows[:, : packed.n]


def _unpack_slots(packed: PackedExperts) -> torch.Tensor:
    """uint8 [E, N, K] of the stored integers, natural k order, packed row order."""
    qw = packed_rows(packed)
    if packed.bits == 4:
        E, N, B = qw.shape
        pairs = qw.reshape(E, N, B // 32, 16, 2).transpose(-1, -2)  # [.., chunk, byte of the word, j]
        sl = torch.stack((pairs & 15, pairs >> 4), dim=-2)  # [.., chunk, byte, nibble, j]: slice 2 byte + nibble
        qw = sl.reshape(E, N, 2 * B)
    return qw[:, :, : packed.k]


def unpack_q(packed: PackedExperts) -> torch.Tensor:
    """The stored integers back as uint8 [E, N, K], in the original row order (exact inverse of packing)."""
    q = _unpack_slots(packed)
    return _deinterleave_rows(q) if packed.gate_up else q


def dequantize(packed: PackedExperts) -> torch.Tensor:
    """fp32 W [E, N, K] in the original row order: (q - zeros[k // gs]) * scales[k // gs]."""
    qv = _unpack_slots(packed).float()
    g = torch.arange(packed.k, device=qv.device) // packed.group_size  # [K]
    s = packed.scales.float().transpose(1, 2)[:, :, g]  # [E, N, K]
    z = packed.zeros.float().transpose(1, 2)[:, :, g]
    w = (qv - z) * s
    return _deinterleave_rows(w) if packed.gate_up else w


def unpack_offset(bits: int, dtype: torch.dtype) -> float:
    """The constant `unpack_slice` adds to every integer: 128 (bf16) / 1024 (fp16) for int4, 0 for int8."""
    if bits == 8:
        return 0.0
    return 128.0 if dtype == torch.bfloat16 else 1024.0


def kernel_words(packed: PackedExperts) -> torch.Tensor:
    """qweight as the GEMM kernels read it: int16 words (int4: the last dimension halves), the bytes for int8.
    Its strides 0 and 1 are the stride_we / stride_wt of weight_tile_ptrs."""
    return packed.qweight.view(torch.int16) if packed.bits == 4 else packed.qweight


@triton.jit
def weight_tile_ptrs(w_ptr, offs_n, stride_wt, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K / slices] pointers to the words of rows offs_n of one expert's K tile at k = 0, in
    kernel_words(packed) (w_ptr at the expert, stride_wt its stride 1); add k_tile_offset(k0) for the tile at k0."""
    ROW: tl.constexpr = _TILE_K // 4 if BITS == 4 else _TILE_K  # words of a stored tile's row
    rows = (offs_n // _TILE_N).to(tl.int64) * stride_wt + (offs_n % _TILE_N) * ROW
    return w_ptr + rows[:, None] + tl.arange(0, BLOCK_K // 4 if BITS == 4 else BLOCK_K)[None, :]


@triton.jit
def k_tile_offset(k0, BITS: tl.constexpr):
    """Words from weight_tile_ptrs' K tile at k = 0 to the one at k0 (a multiple of BLOCK_K <= TILE_K)."""
    ROW: tl.constexpr = _TILE_K // 4 if BITS == 4 else _TILE_K
    kt = k0 // _TILE_K
    return kt * (_TILE_N * ROW) + (k0 - kt * _TILE_K) // (4 if BITS == 4 else 1)


# unpack_slice's PTX: $1 holds two neighbouring words, $2 the exponent bits of OFFSET twice; $0 gets the
# two weights of slice s (nibble s of each word) as floats OFFSET + q
_SLICE_ASM_0 = tl.constexpr("lop3.b32 $0, $1, 0x000F000F, $2, 0xea;")
_SLICE_ASM_1 = tl.constexpr("{ .reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x000F000F, $2, 0xea; }")
_SLICE_ASM_2 = tl.constexpr("{ .reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x000F000F, $2, 0xea; }")
_SLICE_ASM_3 = tl.constexpr("{ .reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x000F000F, $2, 0xea; }")


@triton.jit
def unpack_slice(raw, S: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Elementwise on a tile of packed words (int4) or bytes (int8): OFFSET + q of slice S, as DT, exact.

    int4 puts q in the mantissa of 128.0 (bf16, 7 mantissa bits) or 1024.0 (fp16): a mask and an OR give
    the float OFFSET + q with no conversion instruction; the GEMM removes OFFSET together with the zero
    point (see _qgemm). Every op here is elementwise so that Triton keeps the words, not the floats, in
    shared memory. ASM (GPU only; the interpreter has no inline PTX) unpacks two words per 32-bit op,
    which the compiler does not do for 16-bit integers on its own (it splits and re-packs each pair).
    """
    if BITS == 8:
        return raw.to(DT)
    else:
        exponent: tl.constexpr = 0x4300 if DT == tl.bfloat16 else 0x6400
        if ASM:
            e = tl.full(raw.shape, exponent, tl.int16)
            if S == 0:
                w = tl.inline_asm_elementwise(_SLICE_ASM_0, "=r,r,r", [raw, e], dtype=tl.int16, is_pure=True, pack=2)
            elif S == 1:
                w = tl.inline_asm_elementwise(_SLICE_ASM_1, "=r,r,r", [raw, e], dtype=tl.int16, is_pure=True, pack=2)
            elif S == 2:
                w = tl.inline_asm_elementwise(_SLICE_ASM_2, "=r,r,r", [raw, e], dtype=tl.int16, is_pure=True, pack=2)
            else:
                w = tl.inline_asm_elementwise(_SLICE_ASM_3, "=r,r,r", [raw, e], dtype=tl.int16, is_pure=True, pack=2)
        else:
            w = ((raw >> (4 * S)) & 15) | exponent
        return w.to(DT, bitcast=True)


@triton.jit
def slice_k_offsets(k0, BITS: tl.constexpr, S: tl.constexpr, BLOCK_K: tl.constexpr):
    """k of each column of slice S of the K tile from k0: [BLOCK_K // 4] (int4) or [BLOCK_K] (int8)."""
    if BITS == 8:
        return k0 + tl.arange(0, BLOCK_K)
    else:
        c = tl.arange(0, BLOCK_K // 4)
        return k0 + (c // 16) * 64 + S * 16 + c % 16


@triton.jit
def join_slices(w0, w1, w2, w3):
    """Four [rows, KW] slices of an int4 K tile -> [rows, 4 KW] in natural k order (column k - k0)."""
    ROWS: tl.constexpr = w0.shape[0]
    KW: tl.constexpr = w0.shape[1]
    CHUNKS: tl.constexpr = KW // 16
    w0 = tl.reshape(w0, (ROWS, CHUNKS, 16))
    w1 = tl.reshape(w1, (ROWS, CHUNKS, 16))
    w2 = tl.reshape(w2, (ROWS, CHUNKS, 16))
    w3 = tl.reshape(w3, (ROWS, CHUNKS, 16))
    j = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [rows, chunk, j, i, h]: slice 2 h + i, k = 64 chunk + 16 s + j
    return tl.reshape(tl.permute(j, (0, 1, 4, 3, 2)), (ROWS, 4 * KW))


@triton.jit
def load_scale_zero(s_ptrs, z_ptrs, mask, OFFSET: tl.constexpr, ZERO: tl.constexpr):
    """One group's scales and OFFSET + zero points as float32, from pointers into a [Gp, N] row.

    ZERO >= 0 (PackedExperts.kernel_zero: symmetric weights) is every zero point: no load, and a constant
    that needs no layout conversion between its uses (sm_90 SASS of the decode tile: 4 -> 2 barriers)."""
    s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ZERO >= 0:
        zo = tl.full(s.shape, OFFSET + ZERO, tl.float32)
    else:
        zo = tl.load(z_ptrs, mask=mask, other=0).to(tl.float32) + OFFSET
    return s, zo
