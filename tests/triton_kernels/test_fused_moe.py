"""fused_moe against its fp32 torch twin, on both paths (Triton GEMMs; dequantize + grouped GEMM).

Tolerance: relative Frobenius error of the output vs the fp32 dequantized reference below 1e-2 for
bfloat16 activations and 2e-3 for float16 (the kernel rounds the SiLU*up intermediate and the output
to the activation dtype; weights are dequantized exactly and accumulated in fp32; the dequant path
also rounds the gate/up and down GEMM outputs to the activation dtype).
"""

import pytest
import torch
from _quant import random_quantized, random_routing, rel_error

from triton_kernels import configs as configs_module
from triton_kernels.configs import DEQUANT_MIN_ROWS_PER_EXPERT, GemmConfig, config_text
from triton_kernels.fused_moe import _grouped_linear, _grouped_mm_runs, device_info, fused_moe, fused_moe_torch
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


def check(x, w13, w2, ids, weights, configs=None, path="auto"):
    y = fused_moe(x, w13, w2, ids, weights, configs=configs, path=path)
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
        # two K tiles an iteration; split 4 of the down GEMM's 4 tiles leaves one per split: the remainder
        (GemmConfig(16, 64, 64, swap_ab=True, int_mma=True, k_unroll=2),
         GemmConfig(16, 64, 64, split_k=4, swap_ab=True, int_mma=True, k_unroll=2)),
        # integer MMA on q - z, swapped and not
        (GemmConfig(16, 64, 64, swap_ab=True, int_mma=True, sub_zero=True),
         GemmConfig(32, 64, 128, split_k=2, int_mma=True, sub_zero=True)),
    ],
)
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (4, PER_CHANNEL)])
def test_configs_and_split_k(configs, bits, group_size, device):
    x = make_block(9, 192, 96, 8, 2, bits, group_size, False, torch.bfloat16, device, seed=3)
    check(*x, configs=configs)


def _tuned_moe_pairs():
    """Each distinct (gate/up, down) config pair of TUNED's MoE blocks, with its bits: the pairs fused_moe runs."""
    pairs = set()
    for (device_name, E, N, K, bits), table in configs_module.TUNED.items():
        down = configs_module.TUNED.get((device_name, E, K, N // 2, bits))
        if E > 1 and down is not None:
            pairs.update((bits, table[b], down[b]) for b in table.keys() & down.keys())
    return sorted(pairs, key=str)


TUNED_MOE_PAIRS = _tuned_moe_pairs()


@pytest.mark.parametrize("bits,gate_up,down", TUNED_MOE_PAIRS,
                         ids=[f"int{b} {config_text(g)} / {config_text(d)}" for b, g, d in TUNED_MOE_PAIRS])
def test_tuned_configs_match_twin(bits, gate_up, down, device):
    # a small block through each tuned pair as it is (K = 256 and 512: 2 and 4 K tiles of 128, so split 8 leaves
    # programs without a K tile), groups of 128 as benchmarked; the GPU run compiles each config for real
    x = make_block(40, 256, 512, 8, 2, bits, 128, True, torch.bfloat16, device, seed=5)
    check(*x, configs=(gate_up, down), path="kernel")


@pytest.mark.parametrize("group_size", [64, 128, PER_CHANNEL])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_joined_slices(group_size, dtype, device):
    # int4 tiles in one group: one MMA per K tile on the joined slices, natural k order (2 K tiles at H=192)
    configs = (GemmConfig(32, 64, 128, join_slices=True), GemmConfig(16, 64, 64, split_k=2, swap_ab=True,
                                                                      join_slices=True))
    x = make_block(9, 192, 96, 8, 2, 4, group_size, False, dtype, device, seed=4)
    check(*x, configs=configs)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, PER_CHANNEL)])
def test_sub_zero_float16(bits, group_size, device):
    # q - z in float16 (OFFSET 1024 for int4), asymmetric zeros
    configs = (GemmConfig(16, 64, 128, swap_ab=True, int_mma=True, sub_zero=True),
               GemmConfig(16, 64, 64, split_k=2, swap_ab=True, int_mma=True, sub_zero=True))
    x = make_block(9, 192, 96, 8, 2, bits, group_size, False, torch.float16, device, seed=6)
    check(*x, configs=configs)


@pytest.mark.parametrize("path", ["kernel", "dequant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_without_tokens(path, dtype, device):
    x, w13, w2, _, weights = make_block(3, 64, 32, 8, 2, 8, 32, False, dtype, device)
    ids = torch.tensor([[5, 0], [0, 5], [5, 0]], device=device)  # six experts idle, among them the first and last
    check(x, w13, w2, ids, weights, path=path)


DEQUANT_CASES = [
    # T, H, I, E, k, bits, group_size, sym, dtype
    (1, 64, 32, 8, 1, 4, 32, True, torch.bfloat16),  # single token, top-1
    (5, 96, 64, 8, 2, 4, 32, True, torch.bfloat16),
    (3, 128, 96, 4, 4, 8, 64, False, torch.float16),
    (4, 64, 64, 16, 8, 4, PER_CHANNEL, False, torch.bfloat16),  # top-8, most experts get no token
    (40, 64, 32, 4, 2, 4, 64, False, torch.bfloat16),  # 20 rows per expert
    (24, 160, 48, 8, 1, 8, 32, False, torch.float16),  # top-1, float16: the per-expert loop
    (9, 100, 40, 8, 2, 4, 32, False, torch.bfloat16),  # H % 8: gate/up runs the loop, down _grouped_mm
    (12, 300, 72, 6, 2, 4, 128, True, torch.bfloat16),  # K = H past one 256-k padding unit
]


@pytest.mark.parametrize("T,H,I,E,k,bits,group_size,sym,dtype", DEQUANT_CASES)
def test_dequant_path_matches_twin(T, H, I, E, k, bits, group_size, sym, dtype, device):
    check(*make_block(T, H, I, E, k, bits, group_size, sym, dtype, device, seed=T + H + k), path="dequant")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scratch_experts", [1, 3])
def test_dequant_path_in_expert_ranges(dtype, scratch_experts, device, monkeypatch):
    # a scratch of 1 or 3 experts' w13: ranges of 1 or 3 experts (the last one shorter), some without rows
    T, H, I, E, k = 6, 64, 32, 8, 2
    monkeypatch.setattr(configs_module, "DEQUANT_SCRATCH_BYTES", scratch_experts * 2 * I * H * dtype.itemsize)
    x, w13, w2, _, weights = make_block(T, H, I, E, k, 4, 32, False, dtype, device, seed=5)
    ids = torch.tensor([[1, 2], [2, 1], [6, 2], [1, 6], [2, 7], [7, 1]], device=device)  # 0, 3-5 idle
    check(x, w13, w2, ids, weights, path="dequant")


@pytest.mark.parametrize("scratch_experts", [1, 8])
def test_dequant_path_drops_ids_outside_the_experts(scratch_experts, device, monkeypatch):
    T, H, I, E, k = 5, 64, 32, 8, 2
    monkeypatch.setattr(configs_module, "DEQUANT_SCRATCH_BYTES", scratch_experts * 2 * I * H * 2)
    x, w13, w2, _, weights = make_block(T, H, I, E, k, 8, 64, True, torch.bfloat16, device, seed=6)
    ids = torch.tensor([[3, -1], [E, 3], [0, 5], [-1, E], [5, 0]], device=device)  # token 3 routed nowhere
    check(x, w13, w2, ids, weights, path="dequant")


def test_auto_path_switches_at_the_threshold(device, monkeypatch):
    # rows per expert T * k / E against the threshold: 2 * 2 / 8 = 0.5 stays, 8 * 2 / 8 = 2 switches
    monkeypatch.setitem(DEQUANT_MIN_ROWS_PER_EXPERT, device_info(torch.device(device))[0], 2)
    for T, taken in ((2, "kernel"), (8, "dequant")):
        x, w13, w2, ids, weights = make_block(T, 64, 32, 8, 2, 4, 32, False, torch.bfloat16, device, seed=T)
        kernel = fused_moe(x, w13, w2, ids, weights, path="kernel")
        dequant = fused_moe(x, w13, w2, ids, weights, path="dequant")
        assert not torch.equal(kernel, dequant)  # the paths round differently: equality names the path taken
        assert torch.equal(fused_moe(x, w13, w2, ids, weights), kernel if taken == "kernel" else dequant)


@pytest.mark.parametrize("dtype,K,grouped_mm", [(torch.bfloat16, 48, True), (torch.float16, 48, False),
                                                (torch.bfloat16, 44, False)])
def test_grouped_linear(dtype, K, grouped_mm, device):
    # group g: rows offs[g-1]:offs[g] times w[g]^T; groups 0 and 3 are empty, rows past offs[-1] unused
    g = torch.Generator().manual_seed(K)
    x = torch.randn(11, K, generator=g).to(device, dtype)
    w = torch.randn(4, 24, K, generator=g).to(device, dtype)
    offs = torch.tensor([0, 4, 9, 9], dtype=torch.int32, device=device)
    if device == "cpu":  # on a GPU the answer also depends on its architecture
        assert _grouped_mm_runs(x) == grouped_mm
    y = _grouped_linear(x, w, offs)
    assert y.shape == (11, 24) and y.dtype == dtype
    ref = torch.cat([x[0:4].float() @ w[1].float().T, x[4:9].float() @ w[2].float().T])
    torch.testing.assert_close(y[:9].float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())


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
    with pytest.raises(ValueError, match="path must be one of"):
        fused_moe(x, w13, w2, ids, weights, path="grouped")


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
@pytest.mark.parametrize("path", ["kernel", "dequant"])
def test_real_sizes_gpu(T, H, I, E, k, bits, group_size, sym, path):
    check(*make_block(T, H, I, E, k, bits, group_size, sym, torch.bfloat16, "cuda", seed=T), path=path)
