import pytest
import torch
import triton
import triton.language as tl
from _quant import dequant_reference, random_quantized

from triton_kernels.packing import (
    K_ALIGN, dequantize, half_k_offsets, pack_experts, pack_linear, unpack_half, unpack_offset, unpack_q,
)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,group_size", [(96, 32), (256, 64), (200, 128), (72, 1 << 20)])
@pytest.mark.parametrize("gate_up", [False, True])
def test_pack_roundtrip_exact(bits, K, group_size, gate_up):
    g = torch.Generator().manual_seed(bits * K + gate_up)
    q, s, z = random_quantized(3, 10, K, bits, group_size, sym=False, generator=g)
    p = pack_experts(q, s, z, bits, group_size, gate_up=gate_up)
    Kp = -(-K // K_ALIGN) * K_ALIGN
    assert p.qweight.dtype == torch.uint8 and p.qweight.shape == (3, 10, Kp * bits // 8)
    assert p.k == K and p.k_padded == Kp and p.n == 10 and p.num_experts == 3
    assert torch.equal(unpack_q(p), q)
    assert torch.equal(dequantize(p), dequant_reference(q, s, z, group_size))


def test_gate_up_rows_interleaved():
    q, s, z = random_quantized(2, 8, 64, 4, 32, sym=True)
    p = pack_experts(q, s, z, 4, 32, gate_up=True)
    plain = pack_experts(q, s, z, 4, 32)
    # packed row 2i is gate row i, packed row 2i+1 is up row I+i
    assert torch.equal(p.qweight[:, 0::2], plain.qweight[:, :4])
    assert torch.equal(p.qweight[:, 1::2], plain.qweight[:, 4:])
    assert torch.equal(p.scales[:, :, 1::2], plain.scales[:, :, 4:])


def test_nibble_order():
    # int4: in each chunk of 64 k, byte j holds k = j (low nibble) and k = j + 32 (high nibble)
    q = (torch.arange(64, dtype=torch.uint8) % 16).reshape(1, 1, 64)
    s = torch.ones(1, 1, 1, dtype=torch.float16)
    p = pack_experts(q, s, torch.zeros(1, 1, 1, dtype=torch.uint8), 4, 64)
    row = p.qweight[0, 0]
    assert row[0].item() == 0x00 and row[1].item() == 0x11 and row[31].item() == 0xFF
    assert torch.all(row[32:] == 0)  # K padding holds zeros
    q[0, 0, 32:] = 0
    p = pack_experts(q, s, torch.zeros(1, 1, 1, dtype=torch.uint8), 4, 64)
    assert p.qweight[0, 0, 5].item() == 5  # high nibble (k = 37) now 0


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
def _read_tile(w_ptr, out_ptr, stride_wn, BITS: tl.constexpr, BLOCK_K: tl.constexpr, N: tl.constexpr):
    # out[n, k] = q[n, k] for k < BLOCK_K, read the way the GEMM reads a K tile (two halves for int4)
    KB: tl.constexpr = BLOCK_K * BITS // 8
    n = tl.arange(0, N)
    raw = tl.load(w_ptr + n[:, None] * stride_wn + tl.arange(0, KB)[None, :])
    for h in tl.static_range(8 // BITS):
        q = (unpack_half(raw, h, BITS, tl.float16) - unpack_offset_fp16(BITS)).to(tl.int32)
        tl.store(out_ptr + n[:, None] * BLOCK_K + half_k_offsets(0, BITS, h, BLOCK_K)[None, :], q)


@triton.jit
def unpack_offset_fp16(BITS: tl.constexpr):
    if BITS == 8:
        return 0.0
    else:
        return 1024.0


@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_reader_matches_unpack(bits, device):
    # the device-side reader (unpack_half, half_k_offsets) recovers every stored integer exactly
    q, s, z = random_quantized(1, 16, 128, bits, 64, sym=False, device=device)
    p = pack_experts(q, s, z, bits, 64)
    assert unpack_offset(bits, torch.float16) == (0.0 if bits == 8 else 1024.0)
    out = torch.empty(16, 128, dtype=torch.int32, device=device)
    _read_tile[(1,)](p.qweight[0], out, p.qweight.stride(1), BITS=bits, BLOCK_K=128, N=16)
    assert torch.equal(out.to(torch.uint8), q[0])
