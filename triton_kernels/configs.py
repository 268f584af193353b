"""Launch configurations as data: tuned entries keyed by shape, bits and device, plus a default rule.

TUNED[(device_name, E, N, K, bits)] maps a token-count bucket (the largest token count it covers)
to a config. Lookups take the smallest bucket >= the token count; shapes or devices with no entry
use default_config(), which is sized from rows per expert and the SM count.
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4


def _c(bm, bn, bk, sk=1, gm=8, w=4, s=4):
    return GemmConfig(bm, bn, bk, sk, gm, w, s)


# Filled from scripts/bench_kernels.py runs; see benchmarks/kernels.md for the numbers behind them.
TUNED: dict[tuple[str, int, int, int, int], dict[int, GemmConfig]] = {}

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def default_config(E: int, N: int, K: int, bits: int, num_tokens: int, top_k: int,
                   num_sms: int = 132, splittable: bool = True) -> GemmConfig:
    """Rule for untuned shapes. Small rows-per-expert: thin tiles, long K tiles and split-K so that
    about two waves of programs stream the weights; large: MMA-sized tiles."""
    pairs = max(num_tokens * top_k, 1)
    hit = min(E, pairs)
    rows = pairs / hit  # average rows per hit expert
    # BLOCK_M 64 even for one row: Hopper's wgmma takes 64 rows, and the dequantized weight tile
    # is stored once to shared memory for it (the m16n8k16 path for BLOCK_M 16 needs many more
    # register shuffles per weight); the idle rows cost only zero-filled shared memory.
    if rows <= 32:
        cfg = _c(64, 128, 128 if bits == 4 else 64, w=4, s=4)
    elif rows <= 96:
        cfg = _c(64, 128, 64, w=4, s=4)
    else:
        cfg = _c(128, 256 if bits == 4 else 128, 64, w=8, s=3)
    if splittable:
        m_blocks = hit * max(1, -(-int(rows) // cfg.block_m))
        tiles = m_blocks * -(-N // cfg.block_n)
        k_tiles = -(-K // cfg.block_k)
        split = 1
        while tiles * split < 2 * num_sms and split * 2 <= min(16, k_tiles // 2):
            split *= 2
        cfg = replace(cfg, split_k=split)
    return cfg


def get_config(device_name: str, E: int, N: int, K: int, bits: int, num_tokens: int, top_k: int,
               num_sms: int = 132, splittable: bool = True) -> GemmConfig:
    """Tuned config for (device, E, N, K, bits) at this token count, else default_config()."""
    table = TUNED.get((device_name, E, N, K, bits))
    if table:
        for bucket in sorted(table):
            if num_tokens <= bucket:
                cfg = table[bucket]
                break
        else:
            cfg = table[max(table)]
        return cfg if splittable else replace(cfg, split_k=1)
    return default_config(E, N, K, bits, num_tokens, top_k, num_sms, splittable)
