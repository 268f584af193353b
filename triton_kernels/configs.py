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
    swap_ab: bool = False  # compute (W A^T)^T: weights as the register operand, tokens as MMA N


def _c(bm, bn, bk, sk=1, gm=8, w=4, s=4, swap=False):
    return GemmConfig(bm, bn, bk, sk, gm, w, s, swap)


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
    # Few rows per expert: swap A and B so the weights are the register operand of the MMA and the
    # tokens its N (16 or 32); many rows: dequantize into a shared tile reused by BLOCK_M rows.
    if rows <= 32:
        cfg = _c(16 if rows <= 16 else 32, 128, 128, w=4, s=4, swap=True)
    elif rows <= 96:
        cfg = _c(64, 128, 64, w=4, s=4)
    else:
        cfg = _c(128, 128, 64, w=8, s=3)
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
