"""fused_moe against its fp32 torch twin.

Tolerance: relative Frobenius error of the output vs the fp32 dequantized reference below 1e-2 for
bfloat16 activations and 2e-3 for float16 (the kernel rounds the SiLU*up intermediate and the output
to the activation dtype; weights are dequantized exactly and accumulated in fp32).
"""

import pytest
import torch
from _quant import random_quantized, random_routing, rel_error

from triton_kernels.configs import GemmConfig
from triton_kernels.fused_moe import fused_moe, fused_moe_torch
from triton_kernels.packing import pack_experts

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
PER_CHANNEL = 1 << 30


def make_block(T, H, I, E, k, bits, group_size, sym, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = pack_experts(*random_quantized(E, 2 * I, H, bits, group_size, sym, device, g), bits, group_size,
                       gate_up=True)
    w2 = pack_experts(*random_quantized(E, H, I, bits, group_size, sym, device, g), bits, group_size)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    ids, weights = random_routing(T, E, k, device, g)
    return x, w13, w2, ids, weights


def check(x, w13, w2, ids, weights, configs=None):
    y = fused_moe(x, w13, w2, ids, weights, configs=configs)
    ref = fused_moe_torch(x, w13, w2, ids, weights)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    err = rel_error(y, ref)
    assert err < TOL[x.dtype], err


CASES = [
    # T, H, I, E, k, bits, group_size, sym, dtype
    (1, 64, 32, 8, 1, 4, 32, True, torch.bfloat16),  # single token, top-1
    (5, 96, 64, 8, 2, 4, 32, True, torch.bfloat16),  # H=96: K not a multiple of BLOCK_K
    (3, 128, 96, 4, 4, 8, 64, False, torch.float16),
    (4, 64, 64, 16, 8, 4, PER_CHANNEL, False, torch.bfloat16),  # top-8, most experts get no token
    (6, 256, 128, 8, 2, 8, 128, True, torch.bfloat16),
    (7, 128, 64, 8, 4, 4, 128, False, torch.float16),
    (2, 96, 32, 16, 2, 8, PER_CHANNEL, True, torch.float16),
    (40, 64, 32, 4, 2, 4, 64, False, torch.bfloat16),  # 20 rows per expert: several row blocks
]


@pytest.mark.parametrize("T,H,I,E,k,bits,group_size,sym,dtype", CASES)
def test_matches_twin(T, H, I, E, k, bits, group_size, sym, dtype, device):
    check(*make_block(T, H, I, E, k, bits, group_size, sym, dtype, device, seed=T + H + k))


@pytest.mark.parametrize(
    "configs",
    [
        (GemmConfig(16, 32, 64), GemmConfig(16, 32, 64, split_k=2)),
        (GemmConfig(32, 64, 128, group_m=2), GemmConfig(16, 64, 32, split_k=4)),  # different BLOCK_M
        (GemmConfig(16, 64, 64, swap_ab=True, int_mma=True), GemmConfig(32, 64, 128, split_k=3, swap_ab=True,
                                                                          int_mma=True)),
        (GemmConfig(32, 64, 64, int_mma=True), GemmConfig(16, 32, 128, split_k=2, swap_ab=True)),  # the other two
    ],
)
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (4, PER_CHANNEL)])
def test_configs_and_split_k(configs, bits, group_size, device):
    x = make_block(9, 192, 96, 8, 2, bits, group_size, False, torch.bfloat16, device, seed=3)
    check(*x, configs=configs)


def test_experts_without_tokens(device):
    x, w13, w2, _, weights = make_block(3, 64, 32, 8, 2, 8, 32, False, torch.float16, device)
    ids = torch.tensor([[5, 0], [0, 5], [5, 0]], device=device)  # six experts idle
    check(x, w13, w2, ids, weights)


def test_rejects_bad_input(device):
    x, w13, w2, ids, weights = make_block(2, 64, 32, 4, 2, 4, 32, True, torch.bfloat16, device)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_moe(x.float(), w13, w2, ids, weights)
    with pytest.raises(ValueError, match="gate_up=True"):
        fused_moe(x, w2, w2, ids, weights)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, w13, ids, weights)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, w13, w2, ids, weights[:, :1])
    with pytest.raises(ValueError, match="split_k"):
        fused_moe(x, w13, w2, ids, weights, configs=(GemmConfig(16, 32, 64, split_k=2),) * 2)


REAL = [
    # Qwen3-30B-A3B, Mixtral-8x7B and DeepSeek-V3 blocks (DeepSeek with 32 of its 256 experts so
    # that the fp32 reference fits); GPU only
    (1, 2048, 768, 128, 8), (16, 2048, 768, 128, 8), (300, 2048, 768, 128, 8),
    (1, 4096, 14336, 8, 2), (64, 4096, 14336, 8, 2),
    (4, 7168, 2048, 32, 8), (1024, 7168, 2048, 32, 8),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need a GPU")
@pytest.mark.parametrize("T,H,I,E,k", REAL)
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (8, PER_CHANNEL, False)])
def test_real_sizes_gpu(T, H, I, E, k, bits, group_size, sym):
    check(*make_block(T, H, I, E, k, bits, group_size, sym, torch.bfloat16, "cuda", seed=T))
