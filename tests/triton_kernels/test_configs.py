import pytest

from triton_kernels import configs
from triton_kernels.configs import (
    DEQUANT_MIN_ROWS,
    DEQUANT_MIN_ROWS_PER_EXPERT,
    TUNED,
    GemmConfig,
    config_text,
    default_config,
    dequant_chunk_experts,
    get_config,
    use_dequant,
)
from triton_kernels.packing import SUPPORTED_BITS, TILE_K


def _power_of_two(n):
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize("key", sorted(TUNED))
def test_tuned_entries_are_launchable(key):
    _, E, N, K, bits = key
    assert bits in SUPPORTED_BITS and E >= 1 and N >= 1 and K >= 1
    for bucket, cfg in TUNED[key].items():
        assert bucket >= 1
        assert all(_power_of_two(b) for b in (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k))
        assert cfg.block_m >= 16 and cfg.block_k <= TILE_K  # MMA minimum; a K tile lies in one stored tile
        assert cfg.num_warps in (4, 8) and cfg.num_stages >= 2


def test_lookup_takes_the_smallest_bucket_covering_the_tokens():
    key = next(iter(TUNED))
    name, E, N, K, bits = key
    table = TUNED[key]
    buckets = sorted(table)
    for T in (1, buckets[0] + 1, buckets[-1], buckets[-1] * 4):
        covering = [b for b in buckets if b >= T]
        want = table[covering[0] if covering else buckets[-1]]
        assert get_config(name, E, N, K, bits, T, 2) == want
        assert get_config(name, E, N, K, bits, T, 2, splittable=False).split_k == 1


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000, 4096])
def test_default_rule(tokens):
    cfg = default_config(8, 1024, 4096, 4, tokens, 2)
    assert cfg.split_k >= 1 and _power_of_two(cfg.block_m)
    assert default_config(8, 1024, 4096, 4, tokens, 2, splittable=False).split_k == 1
    assert get_config("a GPU nobody tuned", 8, 1024, 4096, 4, tokens, 2) == cfg


@pytest.mark.parametrize("tokens", [1, 16, 64, 1000])
@pytest.mark.parametrize("splittable", [True, False])
def test_int8_keeps_tiles_it_was_timed_with(tokens, splittable):
    # the unrolled and q - z int4 tiles are not for int8: 16x128x128 int8 takes > 200 registers, unrolled it spills
    cfg = default_config(8, 28672, 4096, 8, tokens, 2, splittable=splittable)
    assert cfg.k_unroll == 1 and not cfg.sub_zero and cfg.max_regs is None
    if tokens == 1:
        assert (cfg.block_m, cfg.block_n) == (16, 64)


@pytest.mark.parametrize("table", [DEQUANT_MIN_ROWS, DEQUANT_MIN_ROWS_PER_EXPERT])
def test_dequant_thresholds_have_a_default(table):
    assert table["default"] >= 1 and all(rows >= 1 for rows in table.values())


def test_use_dequant():
    table = {"default": 512, "GPU A": 64}
    assert not use_dequant("auto", table, "GPU A", 63) and use_dequant("auto", table, "GPU A", 64)
    assert not use_dequant("auto", table, "GPU B", 511.5) and use_dequant("auto", table, "GPU B", 512)
    assert use_dequant("dequant", table, "GPU A", 1) and not use_dequant("kernel", table, "GPU A", 1 << 20)
    with pytest.raises(ValueError, match="path must be one of"):
        use_dequant("fast", table, "GPU A", 1)


def test_dequant_chunk_experts(monkeypatch):
    monkeypatch.setattr(configs, "DEQUANT_SCRATCH_BYTES", 1000)
    assert dequant_chunk_experts(300) == 3 and dequant_chunk_experts(1000) == 1 and dequant_chunk_experts(2000) == 1


def test_config_text_names_every_field_that_differs_from_the_plain_tile():
    assert config_text(GemmConfig(64, 128, 64)) == "64x128x64 s1 w4 st4"
    cfg = GemmConfig(16, 128, 128, split_k=8, num_stages=3, swap_ab=True, int_mma=True, max_regs=128, k_unroll=2,
                     sub_zero=True, join_slices=True)
    assert config_text(cfg) == "16x128x128 s8 w4 st3 swap int r128 u2 sub join"
