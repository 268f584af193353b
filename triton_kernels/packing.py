"""Load-time repacking of quantized expert weights into the layout the GEMM kernels read.

Input (moeq's quantizer output, per expert weight):
    q      uint8   [E, N, K]  unsigned integers in [0, 2**bits - 1]
    scales float16 [E, N, G]  G = ceil(K / group_size); G == 1 means per-channel
    zeros  uint8   [E, N, G]  symmetric checkpoints hold 2**(bits - 1) everywhere
    W[e, n, k] = (q - zeros[e, n, k // gs]) * scales[e, n, k // gs]

Packed layout (`PackedExperts`), built once at load time, never per call:
    qweight int32   [E, N, Kp // P]  P = 32 // bits values per word, K-contiguous. Words pair up:
                                     slot j (bits [j * bits, (j + 1) * bits)) of word 2c + p holds
                                     k = 2P * c + 2j + p. So slot j of words 2c and 2c + 1 are the
                                     neighbours k, k + 1, which the GPU kernel turns into one packed
                                     bf16x2 / fp16x2 register with a prmt and a lop3 (the reason
                                     for the order). A [BLOCK_N, BLOCK_K] tile is BLOCK_N runs of
                                     BLOCK_K * bits / 8 contiguous bytes, read with 16-byte loads.
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
        scales, zeros = _interleave_rows(scales), _interleave_rows(zeros)
    P = 32 // bits
    Kp = -(-K // K_ALIGN) * K_ALIGN
    qweight = torch.empty(E, N, Kp // P, dtype=torch.int32, device=q.device)
    shifts = torch.arange(P, device=q.device, dtype=torch.int64) * bits
    step = max(1, (1 << 26) // (N * Kp))  # experts per chunk: bounds the int64 temporaries at 512 MB
    for e0 in range(0, E, step):
        qc = q[e0 : e0 + step]
        qc = _interleave_rows(qc) if gate_up else qc
        q64 = torch.zeros(qc.shape[0], N, Kp, dtype=torch.int64, device=q.device)
        q64[:, :, :K] = qc
        # k = 2P*c + 2j + p  ->  word 2c + p, slot j (bit offset j * bits); then reinterpret as int32
        slots = q64.reshape(qc.shape[0], N, Kp // (2 * P), P, 2).transpose(-1, -2)
        words = (slots.reshape(qc.shape[0], N, Kp // P, P) << shifts).sum(-1)
        qweight[e0 : e0 + step] = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    Gp = 1 if G == 1 else -(-Kp // group_size)
    sp = torch.zeros(E, Gp, N, dtype=torch.float16, device=q.device)
    zp = torch.zeros(E, Gp, N, dtype=torch.uint8, device=q.device)
    sp[:, :G] = scales.transpose(1, 2)
    zp[:, :G] = zeros.transpose(1, 2)
    return PackedExperts(qweight.contiguous(), sp.contiguous(), zp.contiguous(), bits, group_size, K, gate_up)


def pack_linear(q, scales, zeros, bits: int, group_size: int) -> PackedExperts:
    """Repack a dense layer's q [N, K], scales/zeros [N, G] as a one-expert PackedExperts."""
    return pack_experts(q[None], scales[None], zeros[None], bits, group_size)


def _unpack_slots(packed: PackedExperts) -> torch.Tensor:
    """int32 [E, N, K] of the stored integers, natural k order, packed row order."""
    P = 32 // packed.bits
    E, N, W = packed.qweight.shape
    shifts = torch.arange(P, device=packed.qweight.device, dtype=torch.int32) * packed.bits
    slots = (packed.qweight[..., None] >> shifts) & ((1 << packed.bits) - 1)  # [E, N, words, P]
    q = slots.reshape(E, N, W // 2, 2, P).transpose(-1, -2).reshape(E, N, W * P)
    return q[:, :, : packed.k]


def unpack_q(packed: PackedExperts) -> torch.Tensor:
    """The stored integers back as uint8 [E, N, K], in the original row order (exact inverse of packing)."""
    q = _unpack_slots(packed).to(torch.uint8)
    return _deinterleave_rows(q) if packed.gate_up else q


def dequantize(packed: PackedExperts) -> torch.Tensor:
    """fp32 W [E, N, K] in the original row order: (q - zeros[k // gs]) * scales[k // gs]."""
    qv = _unpack_slots(packed).float()
    g = torch.arange(packed.k, device=qv.device) // packed.group_size  # [K]
    s = packed.scales.float().transpose(1, 2)[:, :, g]  # [E, N, K]
    z = packed.zeros.float().transpose(1, 2)[:, :, g]
    w = (qv - z) * s
    return _deinterleave_rows(w) if packed.gate_up else w


def _int4_magic_asm_source(magic: str) -> str:
    # out_j for the word pair (a, b) = ($8, $9): prmt gathers bytes [a.b0, a.b1, b.b0, b.b1] (then
    # bytes 2, 3); shifting by 4i brings nibble i of each byte pair to bits 0-3 / 16-19; lop3 0xea
    # computes (t & 0x000F000F) | MAGIC.
    lines = ["{", ".reg .b32 t, u;"]
    for half, sel in ((0, "0x5410"), (1, "0x7632")):
        lines.append(f"prmt.b32 t, $8, $9, {sel};")
        for i in range(4):
            if i:
                lines.append(f"shr.u32 u, t, {4 * i};")
            lines.append(f"lop3.b32 ${4 * half + i}, {'u' if i else 't'}, 0x000F000F, {magic}, 0xea;")
    return "\n".join(lines + ["}"])


# MAGIC puts q in the mantissa of 128.0 (bf16, 7 mantissa bits) or 1024.0 (fp16): MAGIC | q == OFFSET + q
_INT4_ASM_BF16 = tl.constexpr(_int4_magic_asm_source("0x43004300"))
_INT4_ASM_FP16 = tl.constexpr(_int4_magic_asm_source("0x64006400"))


# int8: out_j = prmt(word, 0x4B000000) selecting byte j under the fp32 exponent of 2**23: one
# instruction gives the fp32 2**23 + q.
_INT8_ASM = tl.constexpr(
    "{\n.reg .b32 m;\nmov.b32 m, 0x4B000000;\n"
    + "\n".join(f"prmt.b32 ${j}, $4, m, 0x754{j};" for j in range(4))
    + "\n}"
)


@triton.jit
def _int4_magic_asm(words, DT: tl.constexpr):
    """Elementwise on int32 words: 8 outputs, out_j = bits of OFFSET + (nibble j), as DT.

    Two neighbouring words share each 32-bit output register (pack=2), which makes the packed
    pair (k, k + 1) of the layout: 16 instructions per 16 values.
    """
    if DT == tl.bfloat16:
        out = tl.inline_asm_elementwise(
            asm=_INT4_ASM_BF16, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[words],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2,
        )
    else:
        out = tl.inline_asm_elementwise(
            asm=_INT4_ASM_FP16, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[words],
            dtype=(tl.float16,) * 8, is_pure=True, pack=2,
        )
    return out


@triton.jit
def load_dequant_tile(
    w_base, s_base, z_base,  # pointers: this expert's qweight, scales, zeros
    offs_n, n_mask, k0,  # [BLOCK_N] rows, their mask, first k of the tile (multiple of BLOCK_K)
    stride_wn, stride_sg,
    BITS: tl.constexpr, GROUP_K: tl.constexpr, GROUP_TILE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr,
):
    """Read one [BLOCK_N, BLOCK_K] tile of W from the packed layout, dequantized to DT (fp16/bf16).

    GROUP_K is the group size (Kp for per-channel); GROUP_TILE = min(GROUP_K, BLOCK_K), so the tile
    spans BLOCK_K // GROUP_TILE groups. Each word is loaded once (16-byte loads) and split in
    registers. W = DT(DT(q - z) * DT(s)) on both paths: with USE_ASM (GPU, int4) the integers are
    made by the magic-number asm and subtracted / scaled as packed DT pairs; otherwise (the
    interpreter, int8) the same values come from fp32 arithmetic, exact before the final rounding.
    """
    # tl.join appends its axis last, so in a join tree the outermost join is the fastest axis:
    # join(join(join(o0, o4), join(o2, o6)), join(join(o1, o5), join(o3, o7))) flattens to o0..o7.
    PACK: tl.constexpr = 32 // BITS
    KW: tl.constexpr = BLOCK_K // PACK
    NG: tl.constexpr = BLOCK_K // GROUP_TILE
    BLK: tl.constexpr = 2 * PACK  # k values held by one word pair
    offs_kw = k0 // PACK + tl.arange(0, KW)
    words = tl.load(w_base + offs_n[:, None] * stride_wn + offs_kw[None, :], mask=n_mask[:, None], other=0)
    g = (k0 + tl.arange(0, NG) * GROUP_TILE) // GROUP_K
    sz_offs = offs_n[:, None] + g[None, :] * stride_sg  # [BN, NG]
    s = tl.load(s_base + sz_offs, mask=n_mask[:, None], other=0.0).to(DT)
    z = tl.load(z_base + sz_offs, mask=n_mask[:, None], other=0)
    s = s[:, :, None, None, None]
    z = z[:, :, None, None, None]
    if USE_ASM and BITS == 8:
        o0, o1, o2, o3 = tl.inline_asm_elementwise(
            asm=_INT8_ASM, constraints="=r,=r,=r,=r,r", args=[words], dtype=(tl.float32,) * 4, is_pure=True, pack=1,
        )
        x = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BLOCK_N, NG, GROUP_TILE // BLK, 2, PACK))
        w = (x - (z.to(tl.float32) + 8388608.0)).to(DT) * s
    elif USE_ASM and BITS == 4:
        o0, o1, o2, o3, o4, o5, o6, o7 = _int4_magic_asm(words, DT)
        x = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
        # [BN, groups, word pairs per group, word parity p, slot j]
        x = tl.reshape(x, (BLOCK_N, NG, GROUP_TILE // BLK, 2, PACK))
        if DT == tl.bfloat16:
            zo = (z.to(tl.float32) + 128.0).to(DT)
        else:
            zo = (z.to(tl.float32) + 1024.0).to(DT)
        w = (x - zo) * s
    else:
        if BITS == 8:
            q = tl.join(tl.join(words & 255, (words >> 16) & 255), tl.join((words >> 8) & 255, (words >> 24) & 255))
        else:
            q = tl.join(
                tl.join(tl.join(words & 15, (words >> 16) & 15), tl.join((words >> 8) & 15, (words >> 24) & 15)),
                tl.join(tl.join((words >> 4) & 15, (words >> 20) & 15), tl.join((words >> 12) & 15, (words >> 28) & 15)),
            )
        q = tl.reshape(q, (BLOCK_N, NG, GROUP_TILE // BLK, 2, PACK))
        w = ((q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)).to(DT)
    # k = BLK * c + 2j + p: move p inside j, then flatten
    return tl.reshape(tl.permute(w, (0, 1, 2, 4, 3)), (BLOCK_N, BLOCK_K))
