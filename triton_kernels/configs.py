"""Launch configurations as data: tuned entries keyed by shape, bits and device, plus a default rule.

TUNED[(device_name, E, N, K, bits)] maps a token-count bucket (the largest token count it covers)
to a config. Lookups take the smallest bucket >= the token count; shapes or devices with no entry
use default_config(), which is sized from rows per expert and the SM count.
DEQUANT_MIN_ROWS* say from how many rows quant_linear and fused_moe dequantize the weights once per call
and run the vendor GEMM instead of the Triton GEMM (see use_dequant).
"""

import functools
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
    int_mma: bool = False  # MMA on the raw integers, scale and zero point applied once per group
    max_regs: int | None = None  # ptxas register cap per thread (Triton's maxnreg): more programs per SM
    k_unroll: int = 1  # K tiles per iteration of the GEMM's loop: their weight loads issue together
    sub_zero: bool = False  # int_mma on q - z (one subtraction per weight pair) instead of sum_k a per group
    join_slices: bool = False  # dequantized int4: one MMA per K tile, its four slices joined (see _qgemm)


def config_text(c: GemmConfig) -> str:
    """A config as the benchmarks print it (and scripts/sass_report.py parses it), e.g.
    "16x128x128 s8 w4 st3 swap int sub": BLOCK_MxBLOCK_NxBLOCK_K, split-K, warps, stages, then the options."""
    mode = (" swap" if c.swap_ab else "") + (" int" if c.int_mma else "") + (f" r{c.max_regs}" if c.max_regs else "") \
        + (f" u{c.k_unroll}" if c.k_unroll > 1 else "") + (" sub" if c.sub_zero else "") \
        + (" join" if c.join_slices else "")
    return f"{c.block_m}x{c.block_n}x{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}{mode}"


def _c(bm, bn, bk, sk=1, gm=8, w=4, s=4, swap=False, int_mma=False, regs=None, unroll=1, sub=False, join=False):
    return GemmConfig(bm, bn, bk, sk, gm, w, s, swap, int_mma, regs, unroll, sub, join)


# From `scripts/bench_kernels.py --sweep` on an H100 (int4); benchmarks/kernels.md has the numbers behind them.
# Session 11 (run 37 of kernels_v2_h100.txt, tile-major weights): 1-64 tokens for all three blocks. Session 12
# (run 40, tile-major weights): Mixtral and Qwen3 at 256-4096 tokens re-swept; new winners only at 256 tokens
# (Mixtral down, Qwen3 both GEMMs); the others won again (Qwen3 4096 down tied a joined tile, 379.8 vs 379.5 us).
# Session 9 (runs 32-33, row-major weights): DeepSeek 4096. DeepSeek at 256/1024 tokens are session 5's (run 21),
# 16-32-row tiles of the kind the decode sweeps pick.
TUNED: dict[tuple[str, int, int, int, int], dict[int, GemmConfig]] = {
    ('NVIDIA H100 80GB HBM3', 8, 28672, 4096, 4): {  # Mixtral-8x7B gate/up
        1: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        16: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        64: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        256: _c(64, 256, 64, w=8, s=3, swap=True),
        1024: _c(64, 256, 64, w=8, s=3, swap=True),
        4096: _c(128, 256, 128, w=8, s=3, swap=True),
    },
    ('NVIDIA H100 80GB HBM3', 8, 4096, 14336, 4): {  # Mixtral-8x7B down
        1: _c(16, 128, 128, sk=8, s=3, swap=True, int_mma=True, sub=True),
        16: _c(16, 128, 128, sk=2, s=3, swap=True, int_mma=True, sub=True),
        64: _c(16, 128, 128, sk=8, s=3, swap=True, int_mma=True, sub=True),
        256: _c(128, 128, 64, sk=2, swap=True),
        1024: _c(128, 128, 128, sk=2, s=3, swap=True),
        4096: _c(128, 128, 64, sk=2, w=8, s=3, join=True),
    },
    ('NVIDIA H100 80GB HBM3', 128, 1536, 2048, 4): {  # Qwen3-30B-A3B gate/up
        1: _c(16, 128, 128, swap=True, int_mma=True),
        16: _c(16, 128, 128, s=3, swap=True, int_mma=True),
        64: _c(16, 128, 128, s=3, swap=True, int_mma=True),
        256: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        1024: _c(64, 256, 64, w=8, s=3, swap=True),
        4096: _c(64, 256, 64, w=8, s=3, swap=True),
    },
    ('NVIDIA H100 80GB HBM3', 128, 2048, 768, 4): {  # Qwen3-30B-A3B down
        1: _c(16, 64, 128, sk=2, s=3, swap=True, int_mma=True, regs=80),
        16: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        64: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        256: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        1024: _c(64, 128, 64, swap=True),
        4096: _c(128, 128, 128, s=3, swap=True),
    },
    ('NVIDIA H100 80GB HBM3', 256, 4096, 7168, 4): {  # DeepSeek-V3 gate/up
        1: _c(16, 128, 128, swap=True, int_mma=True, sub=True),
        16: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        64: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        256: _c(16, 128, 128, swap=True, int_mma=True),
        1024: _c(32, 128, 128, s=3, swap=True, int_mma=True),
        4096: _c(64, 256, 64, w=8, s=3, swap=True),
    },
    ('NVIDIA H100 80GB HBM3', 256, 7168, 2048, 4): {  # DeepSeek-V3 down
        1: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        16: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        64: _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True),
        256: _c(16, 128, 128, swap=True),
        1024: _c(32, 128, 128, swap=True),
        4096: _c(128, 128, 64, w=8, s=3, join=True),
    },
    # Dense layers (quant_linear: E = 1, buckets are rows M), session 9's dense sweep (run 34), int4 and int8. The
    # sweep's winners, except where the default rule's tile (not among the candidates) was faster in run 33
    # (int4 14336x4096 at 256 rows: 85.1 vs 111.8 us) or the winner's output was not finite (int8 4096x4096 at
    # 256 rows, 128x128x64 s4 w8 st3 swap: rel err inf in run 34's table); those two keep the default rule's tile.
    ('NVIDIA H100 80GB HBM3', 1, 4096, 4096, 4): {
        1: _c(16, 128, 128, sk=8, swap=True, int_mma=True),
        16: _c(16, 128, 128, sk=8, swap=True, int_mma=True),
        64: _c(32, 128, 128, sk=4, swap=True, int_mma=True),
        256: _c(32, 128, 128, swap=True, int_mma=True),
    },
    ('NVIDIA H100 80GB HBM3', 1, 14336, 4096, 4): {
        1: _c(16, 128, 128, sk=8, swap=True, int_mma=True),
        16: _c(16, 128, 128, sk=8, swap=True),
        64: _c(32, 128, 128, swap=True, int_mma=True),
        256: _c(128, 128, 128, s=3, swap=True),
    },
    ('NVIDIA H100 80GB HBM3', 1, 4096, 4096, 8): {
        1: _c(16, 64, 128, sk=4, swap=True, int_mma=True),
        16: _c(16, 64, 128, sk=4, swap=True, int_mma=True),
        64: _c(64, 128, 64, sk=8),
        256: _c(256, 128, 64, sk=4, w=8, s=3, swap=True),
    },
    ('NVIDIA H100 80GB HBM3', 1, 14336, 4096, 8): {
        1: _c(16, 64, 128, sk=2, swap=True, int_mma=True),
        16: _c(16, 64, 128, sk=2, swap=True, int_mma=True),
        64: _c(64, 128, 64, sk=2),
        256: _c(128, 128, 64, w=8, s=3),
    },
}

# From this many rows the Triton GEMM loses to dequantizing the weights once per call and running the
# vendor GEMM: quant_linear counts rows M (cuBLAS via F.linear), fused_moe rows per expert T * top_k / E
# (torch._grouped_mm; the average over all E experts). Keyed by device name, "default" for the rest (the
# H100's values until another device is measured). H100, `scripts/bench_kernels.py` (benchmarks/kernels.md):
# dense 4096x4096 and 14336x4096, int4 and int8, with the default rule of session 5 (run 24): the Triton
# GEMM ties or wins at 256 rows (int4 40.9 vs 40.0 us, 91.5 vs 116.1 us), dequant wins from 512 (44.7 vs
# 64.4 us, 152.4 vs 175.4 us; 257-511 rows not measured); Mixtral's MoE block faster from 2048 rows per
# expert (T = 8192: 12.6 vs 14.4 ms, run 22 12.66 vs 14.43 ms), slower at 1024 and below; Qwen3- and
# DeepSeek-shaped blocks lost at every count measured (up to 256 and 128 rows per expert) and reach 2048
# only beyond 32k tokens per call.
DEQUANT_MIN_ROWS: dict[str, int] = {"default": 512}
DEQUANT_MIN_ROWS_PER_EXPERT: dict[str, int] = {"default": 2048}
# fused_moe's dequant path dequantizes a contiguous range of experts at a time into one scratch buffer of
# at most this many bytes (one expert at the least); most MoE layers fit in one range.
DEQUANT_SCRATCH_BYTES = 1 << 30
PATHS = ("auto", "kernel", "dequant")


def use_dequant(path: str, min_rows: dict[str, int], device_name: str, rows: float) -> bool:
    """Whether a call takes the dequant path: forced by path "kernel" / "dequant", else ("auto") when
    rows reach min_rows[device_name] (or min_rows["default"])."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return rows >= min_rows.get(device_name, min_rows["default"])
    return path == "dequant"


def dequant_chunk_experts(expert_bytes: int) -> int:
    """Experts per dequantized range such that the scratch stays within DEQUANT_SCRATCH_BYTES."""
    return max(1, DEQUANT_SCRATCH_BYTES // expert_bytes)


def default_config(E: int, N: int, K: int, bits: int, num_tokens: int, top_k: int,
                   num_sms: int = 132, splittable: bool = True) -> GemmConfig:
    """Rule for untuned shapes, from the H100 sweeps. Few rows per expert: thin tiles, long K tiles and
    split-K so that about two waves of programs stream the weights; many: MMA-sized tiles."""
    pairs = max(num_tokens * top_k, 1)
    hit = min(E, pairs)
    rows = pairs / hit  # average rows per hit expert
    # Few rows: the weights are the register operand of the MMA (swap_ab), the tokens its N, and the
    # MMA runs on the raw integers (int_mma). Many: 64-256 tokens share each dequantized weight tile.
    if bits == 8:
        cfg = _int8_tile(rows)
    elif rows <= 16:  # 128 weight rows on q - z (run 30: the best or within 2.3% of it at every down GEMM bucket)
        cfg = _c(16, 128, 128, s=3, swap=True, int_mma=True, sub=True)
        # Unsplit GEMMs (gate/up) with <= 8 rows and >= 3 programs per SM: two K tiles an iteration, capped at 128
        # registers. Run 30's nine gate/up buckets: this picks the winner in each (the unrolled tile won the six
        # that pass, by 3-22%, and lost the other three by 3-36%); no other shape was measured.
        if not splittable and rows <= 8 and hit * -(-N // cfg.block_n) >= 3 * num_sms:
            cfg = replace(cfg, sub_zero=False, max_regs=128, k_unroll=2)
    elif rows <= 32:
        cfg = _c(32, 64, 128, swap=True, int_mma=True)
    elif rows <= 128:  # run 29 at 64-128 rows: within 14% of the best in each of its six buckets
        cfg = _c(64, 128, 64, swap=True)
    else:  # run 29 at 256-1024 rows: within 3% of the best in each of its six buckets
        cfg = _c(128, 128, 128, s=3, swap=True)
    if splittable:
        m_blocks = hit * max(1, -(-int(rows) // cfg.block_m))
        tiles = m_blocks * -(-N // cfg.block_n)
        k_tiles = -(-K // cfg.block_k)
        # Streaming tiles (<= 64 rows) split towards two waves of programs; MMA-bound tiles only while the
        # doubled split stays within one wave: the dense sweep of run 23 (256 and 1024 rows, 4096x4096 and
        # 14336x4096, int4 and int8) had split 4 win at 32 tiles and no split at 112 or more.
        streaming = cfg.block_m <= 64
        split = 1
        while ((tiles * split < 2 * num_sms) if streaming else (tiles * split * 2 <= num_sms)) \
                and split * 2 <= min(16, k_tiles // 2):
            split *= 2
        cfg = replace(cfg, split_k=split)
    return cfg


def _int8_tile(rows: float) -> GemmConfig:
    """int8 tiles by rows per expert: session 5's rule, the one its int8 tables (runs 22-24) were timed with.
    The int4 tiles of session 8 do not carry over: 16x128x128 takes 213-227 registers in int8 (2 programs
    per SM) and the unrolled one spills (sm_90 SASS, scripts/sass_report.py --bits 8)."""
    if rows <= 16:
        return _c(16, 64, 128, swap=True, int_mma=True)
    if rows <= 32:
        return _c(32, 64, 128, swap=True, int_mma=True)
    if rows <= 64:
        return _c(64, 128, 64)
    if rows <= 128:
        return _c(128, 128, 64, w=8, s=3)
    return _c(256, 128, 64, w=8, s=3, swap=True)


@functools.lru_cache(maxsize=4096)
def get_config(device_name: str, E: int, N: int, K: int, bits: int, num_tokens: int, top_k: int,
               num_sms: int = 132, splittable: bool = True) -> GemmConfig:
    """Tuned config for (device, E, N, K, bits) at this token count, else default_config(). Memoized: a
    decode step asks the same questions every token, and answering costs ~20 us of Python each time."""
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
