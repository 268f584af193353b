"""quant_linear against its fp32 torch twin; tolerances as in test_fused_moe (relative Frobenius
error below 1e-2 for bfloat16, 2e-3 for float16), on both paths (Triton GEMM, dequantize + F.linear)."""

import pytest
import torch
from _quant import random_quantized, rel_error

from triton_kernels.configs import DEQUANT_MIN_ROWS, TUNED, GemmConfig, config_text
from triton_kernels.fused_moe import device_info
from triton_kernels.packing import pack_experts, pack_linear
from triton_kernels.quant_linear import quant_linear, quant_linear_torch

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize(
    "lead,N,K,bits,group_size,sym,dtype,bias,config",
    [
        ((1,), 80, 96, 4, 32, True, torch.bfloat16, False, None),
        ((2, 3), 64, 128, 8, 64, False, torch.float16, True, None),
        ((5,), 48, 200, 4, 1 << 30, False, torch.bfloat16, True, None),  # per-channel, odd K
        ((33,), 96, 256, 4, 128, False, torch.float16, False, GemmConfig(32, 32, 64)),
        ((3,), 64, 256, 8, 32, True, torch.bfloat16, True, GemmConfig(16, 32, 32, split_k=4)),
        ((40,), 64, 192, 4, 64, False, torch.float16, True, GemmConfig(64, 64, 64)),  # dequantized tile
        ((2,), 64, 320, 8, 1 << 30, False, torch.bfloat16, False, GemmConfig(16, 64, 64, split_k=2, swap_ab=True,
                                                                                    int_mma=True)),
        ((70,), 64, 256, 4, 64, True, torch.bfloat16, False, GemmConfig(64, 32, 64, int_mma=True)),
        ((6,), 64, 256, 4, 1 << 30, False, torch.float16, False, GemmConfig(16, 64, 64, swap_ab=True)),
    ],
)
def test_matches_twin(lead, N, K, bits, group_size, sym, dtype, bias, config, device):
    g = torch.Generator().manual_seed(N + K)
    q, s, z = random_quantized(1, N, K, bits, group_size, sym, device, g)
    w = pack_linear(q[0], s[0], z[0], bits, group_size)
    x = torch.randn(*lead, K, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    y = quant_linear(x, w, b, config=config)
    ref = quant_linear_torch(x, w, b)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert rel_error(y, ref) < TOL[dtype]


# each distinct config of TUNED's dense layers, with its bits: the configs quant_linear runs
TUNED_DENSE = sorted({(bits, cfg) for (_, E, _, _, bits), table in TUNED.items() if E == 1 for cfg in table.values()},
                     key=str)


@pytest.mark.parametrize("bits,config", TUNED_DENSE, ids=[f"int{b} {config_text(c)}" for b, c in TUNED_DENSE])
def test_tuned_configs_match_twin(bits, config, device):
    # 40 rows of a 256 x 512 layer (4 K tiles of 128, so split 8 leaves programs without one), groups of 128
    g = torch.Generator().manual_seed(bits)
    q, s, z = random_quantized(1, 256, 512, bits, 128, True, device, g)
    w = pack_linear(q[0], s[0], z[0], bits, 128)
    x = torch.randn(40, 512, generator=g).to(device, torch.bfloat16)
    y = quant_linear(x, w, config=config, path="kernel")
    assert torch.isfinite(y).all() and rel_error(y, quant_linear_torch(x, w)) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "lead,N,K,bits,group_size,sym,dtype,bias",
    [
        ((1,), 80, 96, 4, 32, True, torch.bfloat16, False),
        ((2, 3), 64, 128, 8, 64, False, torch.float16, True),
        ((5,), 48, 200, 4, 1 << 30, False, torch.bfloat16, True),  # per-channel, odd K
        ((33,), 96, 256, 8, 1 << 30, True, torch.float16, False),
        ((40,), 64, 300, 4, 64, False, torch.float16, True),
    ],
)
def test_dequant_path_matches_twin(lead, N, K, bits, group_size, sym, dtype, bias, device):
    g = torch.Generator().manual_seed(N + K)
    q, s, z = random_quantized(1, N, K, bits, group_size, sym, device, g)
    w = pack_linear(q[0], s[0], z[0], bits, group_size)
    x = torch.randn(*lead, K, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    y = quant_linear(x, w, b, path="dequant")
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert rel_error(y, quant_linear_torch(x, w, b)) < TOL[dtype]


def test_auto_path_switches_at_the_threshold(device, monkeypatch):
    monkeypatch.setitem(DEQUANT_MIN_ROWS, device_info(torch.device(device))[0], 4)
    g = torch.Generator().manual_seed(7)
    q, s, z = random_quantized(1, 32, 64, 4, 32, False, device, g)
    w = pack_linear(q[0], s[0], z[0], 4, 32)
    for M, taken in ((3, "kernel"), (4, "dequant"), (9, "dequant")):
        x = torch.randn(M, 64, generator=g).to(device, torch.bfloat16)
        kernel, dequant = quant_linear(x, w, path="kernel"), quant_linear(x, w, path="dequant")
        assert not torch.equal(kernel, dequant)  # the paths round differently: equality names the path taken
        assert torch.equal(quant_linear(x, w), kernel if taken == "kernel" else dequant)


def test_rejects_bad_input(device):
    q, s, z = random_quantized(2, 16, 64, 4, 32, True, device)
    w = pack_linear(q[0], s[0], z[0], 4, 32)
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be"):
        quant_linear(x.float(), w)
    with pytest.raises(ValueError, match="x has K"):
        quant_linear(x[:, :32], w)
    with pytest.raises(ValueError, match="one-expert"):
        quant_linear(x, pack_experts(q, s, z, 4, 32))
    with pytest.raises(ValueError, match="bias"):
        quant_linear(x, w, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="path must be one of"):
        quant_linear(x, w, path="cublas")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need a GPU")
@pytest.mark.parametrize("M", [1, 512])
@pytest.mark.parametrize("N,K", [(4096, 4096), (2048, 1536)])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, 1 << 30)])
@pytest.mark.parametrize("path", ["kernel", "dequant"])
def test_real_sizes_gpu(M, N, K, bits, group_size, path):
    q, s, z = random_quantized(1, N, K, bits, group_size, False, "cuda")
    w = pack_linear(q[0], s[0], z[0], bits, group_size)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    assert rel_error(quant_linear(x, w, path=path), quant_linear_torch(x, w)) < 1e-2
