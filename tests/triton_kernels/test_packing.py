import pytest
import torch
import triton
import triton.language as tl
from _quant import dequant_reference, random_quantized

from triton_kernels.packing import (
    K_ALIGN, TILE_K, TILE_N, dequantize, k_tile_offset, kernel_words, pack_experts, pack_linear, packed_rows,
    slice_k_offsets, unpack_offset, unpack_q, weight_tile_ptrs,
    unpack_slice,
)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,group_size", [(96, 32), (256, 64), (200, 128), (72, 1 << 20)])
@pytest.mark.parametrize("gate_up", [False, True])
def test_pack_roundtrip_exact(bits, K, group_size, gate_up):
    g = torch.Generator().manual_seed(bits * K + gate_up)
    q, s, z = random_quantized(3, 10, K, bits, group_size, sym=False, generator=g)
    p = pack_experts(q, s, z, bits, group_size, gate_up=gate_up)
    Kp = -(-K // K_ALIGN) * K_ALIGN
    assert p.qweight.dtype == torch.uint8 and p.qweight.shape == (3, 1, Kp // TILE_K, TILE_N, TILE_K * bits // 8)
    assert packed_rows(p).shape == (3, 10, Kp * bits // 8)
    assert p.k == K and p.k_padded == Kp and p.n == 10 and p.num_experts == 3
    assert torch.equal(unpack_q(p), q)
    assert torch.equal(dequantize(p), dequant_reference(q, s, z, group_size))


def test_gate_up_rows_interleaved():
    q, s, z = random_quantized(2, 8, 64, 4, 32, sym=True)
    p = pack_experts(q, s, z, 4, 32, gate_up=True)
    plain = pack_experts(q, s, z, 4, 32)
    # packed row 2i is gate row i, packed row 2i+1 is up row I+i
    assert torch.equal(packed_rows(p)[:, 0::2], packed_rows(plain)[:, :4])
    assert torch.equal(packed_rows(p)[:, 1::2], packed_rows(plain)[:, 4:])
    assert torch.equal(p.scales[:, :, 1::2], plain.scales[:, :, 4:])


def test_nibble_order():
    # int4: in each chunk of 64 k, byte 2j holds k = j (low nibble) and j + 16 (high), byte 2j + 1 holds
    # k = j + 32 and j + 48; K padding holds zeros
    q, s, z = random_quantized(1, 3, 100, 4, 64, sym=True)
    b = packed_rows(pack_experts(q, s, z, 4, 64))[0].long()  # [3, 128]: K padded to 256
    q = torch.nn.functional.pad(q[0].long(), (0, 28))  # [3, 128]
    for chunk in range(2):
        for j in range(16):
            k = chunk * 64 + j
            lo, hi = b[:, chunk * 32 + 2 * j], b[:, chunk * 32 + 2 * j + 1]
            assert torch.equal(lo & 15, q[:, k]) and torch.equal(lo >> 4, q[:, k + 16])
            assert torch.equal(hi & 15, q[:, k + 32]) and torch.equal(hi >> 4, q[:, k + 48])
    assert torch.all(b[:, 64:] == 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_tiles_are_contiguous_blocks_of_rows(bits):
    # stored tile (e, i, j) is rows 128 i.. and k 128 j.. of the row layout; rows past N are zeros
    q, s, z = random_quantized(2, 200, 300, bits, 64, sym=False)
    p = pack_experts(q, s, z, bits, 64)
    rows, qw = packed_rows(p), p.qweight
    assert qw.shape == (2, 2, 4, TILE_N, TILE_K * bits // 8) and qw.is_contiguous()  # K padded to 512
    rb = TILE_K * bits // 8
    for i, j in ((0, 0), (1, 3), (0, 1)):
        tile_rows = rows[:, TILE_N * i : TILE_N * (i + 1), rb * j : rb * (j + 1)]
        assert torch.equal(qw[:, i, j, : 200 - TILE_N * i], tile_rows)
    assert torch.all(qw[:, 1, :, 200 - TILE_N :] == 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_only_when_every_zero_is_the_midpoint(bits):
    q, s, z = random_quantized(2, 8, 64, bits, 32, sym=True)
    p = pack_experts(q, s, z, bits, 32)
    assert p.symmetric and p.kernel_zero == 1 << (bits - 1)
    z[1, 5, 1] -= 1  # one group of one row off the midpoint: the kernels must load the zeros
    p = pack_experts(q, s, z, bits, 32)
    assert not p.symmetric and p.kernel_zero == -1


def test_pack_linear_is_one_expert():
    q, s, z = random_quantized(1, 12, 64, 8, 32, sym=True)
    p = pack_linear(q[0], s[0], z[0], 8, 32)
    assert p.num_experts == 1 and torch.equal(unpack_q(p), q)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(bits=3), "bits must be one of"),
        (dict(scales=torch.ones(2, 4, 3, dtype=torch.float32)), "scales must be"),
        (dict(zeros=torch.zeros(2, 4, 5, dtype=torch.uint8)), "zeros must be"),
        (dict(q=torch.full((2, 4, 64), 16, dtype=torch.uint8)), "must lie in"),
        (dict(group_size=24, scales=torch.ones(2, 4, 3, dtype=torch.float16),
              zeros=torch.zeros(2, 4, 3, dtype=torch.uint8)), "power of two"),
    ],
)
def test_pack_rejects_bad_input(change, match):
    q, s, z = random_quantized(2, 4, 64, 4, 32, sym=True)
    args = dict(q=q, scales=s, zeros=z, bits=4, group_size=32) | change
    with pytest.raises(ValueError, match=match):
        pack_experts(**args)


@triton.jit
def _read_tiles(w_ptr, out_ptr, stride_wt, offset, BITS: tl.constexpr, BLOCK_K: tl.constexpr, N: tl.constexpr,
                K: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    # out[n, k] = q[n, k] for n < N, k < K, read the way the GEMM reads its K tiles (four slices for int4)
    SLICES: tl.constexpr = 4 if BITS == 4 else 1
    n = tl.arange(0, N)
    w_ptrs = weight_tile_ptrs(w_ptr, n, stride_wt, BITS, BLOCK_K)
    for k0 in tl.range(0, K, BLOCK_K):
        raw = tl.load(w_ptrs + k_tile_offset(k0, BITS))
        for sl in tl.static_range(SLICES):
            q = (unpack_slice(raw, sl, BITS, DT, ASM).to(tl.float32) - offset).to(tl.int32)
            tl.store(out_ptr + n[:, None] * K + slice_k_offsets(k0, BITS, sl, BLOCK_K)[None, :], q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_reader_matches_unpack(bits, dtype, device):
    # the device-side reader (kernel_words, weight_tile_ptrs, k_tile_offset, unpack_slice, slice_k_offsets)
    # recovers every stored integer exactly, across two row tiles and two k tiles, with 64- and 128-k tiles,
    # with the inline PTX on the GPU and the plain integer ops everywhere
    q, s, z = random_quantized(1, 256, 256, bits, 64, sym=False, device=device)
    p = pack_experts(q, s, z, bits, 64)
    words = kernel_words(p)
    assert words.dtype == (torch.int16 if bits == 4 else torch.uint8)
    dt = tl.float16 if dtype == torch.float16 else tl.bfloat16
    for asm in (False, True) if device == "cuda" else (False,):
        for block_k in (64, 128):
            out = torch.empty(256, 256, dtype=torch.int32, device=device)
            _read_tiles[(1,)](words[0], out, words.stride(1), unpack_offset(bits, dtype), BITS=bits, BLOCK_K=block_k,
                              N=256, K=256, DT=dt, ASM=asm)
            assert torch.equal(out.to(torch.uint8), q[0]), f"asm={asm} block_k={block_k}"
