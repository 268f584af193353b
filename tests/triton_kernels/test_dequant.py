"""dequantize_packed against packing.dequantize cast to the dtype: exact equality (the kernel computes
(q - z) * s in fp32, where it is exact, and rounds once, as the cast does)."""

import pytest
import torch
from _quant import random_quantized

from triton_kernels.dequant import dequantize_packed
from triton_kernels.packing import dequantize, pack_experts

PER_CHANNEL = 1 << 30


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "K,group_size,sym",
    [(96, 32, True), (200, 64, False), (512, 128, False), (72, PER_CHANNEL, True), (300, PER_CHANNEL, False)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_dequantize(bits, K, group_size, sym, dtype, device):
    g = torch.Generator().manual_seed(bits + K)
    p = pack_experts(*random_quantized(3, 80, K, bits, group_size, sym, device, g), bits, group_size)
    w = dequantize_packed(p, dtype)
    assert w.dtype == dtype and w.shape == (3, 80, K)
    assert torch.equal(w, dequantize(p).to(dtype))


@pytest.mark.parametrize("bits", [4, 8])
def test_gate_up_rows_stay_interleaved(bits, device):
    # packed row 2i is gate row i, 2i + 1 up row i; dequantize gives gate rows then up rows
    I = 24
    g = torch.Generator().manual_seed(bits)
    p = pack_experts(*random_quantized(2, 2 * I, 128, bits, 32, False, device, g), bits, 32, gate_up=True)
    w = dequantize_packed(p, torch.bfloat16)
    ref = dequantize(p).to(torch.bfloat16)
    assert torch.equal(w[:, 0::2], ref[:, :I])
    assert torch.equal(w[:, 1::2], ref[:, I:])


@pytest.mark.parametrize("experts,want", [((2, 5), range(2, 5)), (slice(4, None), range(4, 6)),
                                          (slice(-1, None), range(5, 6)), ((3, 3), range(0))])
def test_expert_range(experts, want, device):
    g = torch.Generator().manual_seed(0)
    p = pack_experts(*random_quantized(6, 32, 136, 4, 64, False, device, g), 4, 64)
    w = dequantize_packed(p, torch.float16, experts)
    assert torch.equal(w, dequantize(p)[list(want)].half())


def test_writes_into_out(device):
    g = torch.Generator().manual_seed(1)
    p = pack_experts(*random_quantized(4, 48, 96, 8, 32, True, device, g), 8, 32)
    scratch = torch.full((3 * 48 * 100,), float("nan"), dtype=torch.bfloat16, device=device)
    out = scratch.view(3, 48, 100)[:, :, :96]  # rows padded to 100 elements: any stride but the last works
    assert dequantize_packed(p, torch.bfloat16, (1, 4), out=out) is out
    assert torch.equal(out, dequantize(p)[1:4].bfloat16())
    assert torch.isnan(scratch.view(3, 48, 100)[:, :, 96:]).all()  # nothing written past K


def test_rejects_bad_input(device):
    p = pack_experts(*random_quantized(2, 16, 64, 4, 32, True, device), 4, 32)
    with pytest.raises(ValueError, match="dtype must be float16 or bfloat16, got torch.float32"):
        dequantize_packed(p, torch.float32)
    with pytest.raises(ValueError, match="contiguous range"):
        dequantize_packed(p, torch.float16, slice(0, 2, 2))
    with pytest.raises(TypeError, match="experts must be"):
        dequantize_packed(p, torch.float16, [0, 1])
    with pytest.raises(ValueError, match=r"out must be torch.float16 \(2, 16, 64\)"):
        dequantize_packed(p, torch.float16, out=torch.empty(2, 16, 64, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_packed(p, torch.float16, (0, 1), out=torch.empty(2, 16, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_packed(p, torch.float16, out=torch.empty(2, 16, 64, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        dequantize_packed(p, torch.float16, out=torch.empty(2, 64, 16, dtype=torch.float16,
                                                            device=device).transpose(1, 2))
