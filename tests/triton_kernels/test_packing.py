import pytest
import torch
from _quant import dequant_reference, random_quantized

from triton_kernels.packing import K_ALIGN, dequantize, pack_experts, pack_linear, unpack_q


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,group_size", [(96, 32), (256, 64), (200, 128), (72, 1 << 20)])
@pytest.mark.parametrize("gate_up", [False, True])
def test_pack_roundtrip_exact(bits, K, group_size, gate_up):
    g = torch.Generator().manual_seed(bits * K + gate_up)
    q, s, z = random_quantized(3, 10, K, bits, group_size, sym=False, generator=g)
    p = pack_experts(q, s, z, bits, group_size, gate_up=gate_up)
    Kp = -(-K // K_ALIGN) * K_ALIGN
    assert p.qweight.dtype == torch.int32 and p.qweight.shape == (3, 10, Kp * bits // 32)
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
    # slot j (bits [4j, 4j + 4)) of word 2c + p holds k = 16c + 2j + p: even k in word 0, odd in word 1
    q = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 16)
    s = torch.ones(1, 1, 1, dtype=torch.float16)
    p = pack_experts(q, s, torch.zeros(1, 1, 1, dtype=torch.uint8), 4, 16)
    assert p.qweight[0, 0, 0].item() == 0xECA86420 - (1 << 32)  # int32 view of the word
    assert p.qweight[0, 0, 1].item() == 0xFDB97531 - (1 << 32)
    assert torch.all(p.qweight[0, 0, 2:] == 0)  # K padding holds zeros


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
