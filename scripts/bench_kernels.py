"""Benchmark the int4/int8 fused MoE kernels against the bf16 per-expert loop users run today.

    PYTHONUNBUFFERED=1 python3 scripts/bench_kernels.py [--shapes mixtral qwen3 deepseek]
        [--tokens 1 16 64 256 1024 4096] [--bits 4 8] [--paths kernel dequant] [--sweep] [--dense]
        [--log PATH]

For each MoE block shape, token count and weight format it prints: the time of the whole fused_moe
call (routing + both GEMMs, replayed from a CUDA graph; median of triton.testing.do_bench, which
flushes L2 before every run) and of the same call launched eagerly, the bf16 baseline (transformers'
MixtralExperts.forward loop: per hit expert index, F.linear, SiLU*up, F.linear, index_add), achieved
GB/s and TFLOP/s, the floor max(bytes / 3.0 TB/s, FLOPs / 790 TFLOP/s) where bytes are the touched
experts' weights + fp16 scales, time / floor, speed-up over bf16, and the error relative to the fp32
dequantized reference at one token count per shape. --sweep times each GEMM alone (with --dense also
quant_linear at each row count) over candidate configs (input to triton_kernels/configs.py). Routing is
uniform random, top-k distinct experts.

Each row is one path (--paths): `kernel` (the Triton GEMMs) or `dequant` (dequantize the experts, then
torch._grouped_mm), both forced whatever configs.DEQUANT_MIN_ROWS* say, so the rows of one token count
show the crossover that those thresholds should be set from. A dequant path that takes more than one
expert range syncs with the host and cannot be graphed: its graph column is nan and the derived columns
use its eager time. --dense prints quant_linear's two paths (Triton GEMM; dequantize + F.linear) at the
--tokens row counts.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton_kernels import _qgemm  # noqa: E402
from triton_kernels.configs import TUNED, GemmConfig, config_text, dequant_chunk_experts, get_config  # noqa: E402
from triton_kernels.dequant import dequantize_packed  # noqa: E402
from triton_kernels.fused_moe import device_info, fused_moe, fused_moe_torch  # noqa: E402
from triton_kernels.moe_routing import max_blocks, moe_align_block_size  # noqa: E402
from triton_kernels.packing import pack_experts, pack_linear  # noqa: E402
from triton_kernels.quant_linear import quant_linear, quant_linear_torch  # noqa: E402

SHAPES = {  # name: (E, H, I, top_k)
    "mixtral": (8, 4096, 14336, 2),
    "qwen3": (128, 2048, 768, 8),
    "deepseek": (256, 7168, 2048, 8),
}
DENSE_SHAPES = ((4096, 4096), (14336, 4096))  # (N, K): attention projections, a dense MLP's up
HBM_BPS = 3.0e12
PEAK_FLOPS = 790e12
GROUP_SIZE = 128
PATHS = ("kernel", "dequant")  # fused_moe / quant_linear path= values timed side by side
CHECK_TOKENS = (1, 16, 256)  # token counts checked against the fp32 reference (hit experts only)

ALL_PATH = "/dev/null"  # every sweep timing, set from --sweep-log
LOG_PATH = None  # set from --log; lines are appended as they are printed, so a killed run keeps them


def out(line=""):
    print(line, flush=True)
    if LOG_PATH is not None:
        with open(LOG_PATH, "a") as f:
            f.write(line + "\n")


def bench(fn, graph=True, rep=60):
    """Median microseconds of fn, replayed from a CUDA graph (graph=True) or launched eagerly."""
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    return triton.testing.do_bench(run, warmup=10, rep=rep, return_mode="median") * 1e3


def random_packed(E, N, K, bits, gate_up, gen):
    q = torch.randint(0, 1 << bits, (E, N, K), dtype=torch.uint8, device="cuda", generator=gen)
    G = K // GROUP_SIZE
    s = ((torch.rand(E, N, G, device="cuda", generator=gen) + 0.5) * (2.0 / (1 << bits)) / K**0.5).half()
    z = torch.full((E, N, G), 1 << (bits - 1), dtype=torch.uint8, device="cuda")
    p = pack_experts(q, s, z, bits, GROUP_SIZE, gate_up=gate_up)
    del q
    return p


def hf_bf16_moe(x, gate_up, down, topk_ids, topk_weights):
    """transformers' MixtralExperts.forward: loop over hit experts, index, linear, act, linear, index_add."""
    E = gate_up.shape[0]
    final = torch.zeros_like(x)
    expert_mask = F.one_hot(topk_ids, num_classes=E).permute(2, 1, 0)  # [E, k, T]
    hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        pos, tok = torch.where(expert_mask[e])
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down[e]) * topk_weights[tok, pos, None]
        final.index_add_(0, tok, h.to(final.dtype))
    return final


def routing(T, E, k, gen):
    ids = torch.rand(T, E, device="cuda", generator=gen).argsort(dim=1)[:, :k].contiguous()
    w = torch.softmax(torch.randn(T, k, device="cuda", generator=gen), dim=-1)
    return ids, w


def floor_us(hit, H, I, bits, T, k):
    wbytes = hit * 3 * H * I * (bits / 8 + 2 / GROUP_SIZE)
    flops = 2 * T * k * 3 * H * I
    return max(wbytes / HBM_BPS, flops / PEAK_FLOPS) * 1e6, wbytes, flops


def check_error(x, w13, w2, ids, wts, configs=None, path="kernel"):
    """Relative error vs the fp32 dequantized reference, over the hit experts only (fits memory)."""
    hit = torch.unique(ids)
    sub = lambda p: dataclasses.replace(  # noqa: E731
        p, qweight=p.qweight[hit], scales=p.scales[hit], zeros=p.zeros[hit])
    remap = torch.searchsorted(hit, ids)
    y = fused_moe(x, w13, w2, ids, wts, configs=configs, path=path)
    ref = fused_moe_torch(x, sub(w13), sub(w2), remap, wts)
    return ((y.float() - ref).norm() / ref.norm()).item()


def dequant_us(w13, w2):
    """Time of the dequant path's dequantize_packed calls alone: every expert, one scratch range at a time."""
    E, I, H = w13.num_experts, w2.k, w2.n
    step = dequant_chunk_experts(2 * I * H * 2)
    scratch = torch.empty(min(step, E) * 2 * I * H, device="cuda", dtype=torch.bfloat16)

    def run():
        for e0 in range(0, E, step):
            ne = min(step, E - e0)
            dequantize_packed(w13, torch.bfloat16, (e0, e0 + ne), out=scratch[: ne * 2 * I * H].view(ne, 2 * I, H))
            dequantize_packed(w2, torch.bfloat16, (e0, e0 + ne), out=scratch[: ne * H * I].view(ne, H, I))
    return bench(run)


def run_shape(name, tokens, bits_list, paths, gen, baseline_cache, best):
    E, H, I, k = SHAPES[name]
    dev_name, sms = device_info(torch.device("cuda"))
    # the dequant path makes one host sync per call when its experts take more than one scratch range,
    # and a sync cannot be captured in a CUDA graph: such rows are timed eagerly only
    ranges = -(-E // dequant_chunk_experts(2 * I * H * 2))
    for bits in bits_list:
        w13 = random_packed(E, 2 * I, H, bits, True, gen)
        w2 = random_packed(E, H, I, bits, False, gen)
        t_dq = dequant_us(w13, w2) if "dequant" in paths else float("nan")
        for T in tokens:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
            ids, wts = routing(T, E, k, gen)
            hit = torch.unique(ids).numel()
            fl, wbytes, flops = floor_us(hit, H, I, bits, T, k)
            tuned = best.get((name, T, bits))
            configs = (tuned["gate_up"], tuned["down"]) if tuned else None
            key = (name, T)
            if key not in baseline_cache:
                gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=gen) / H**0.5
                dn = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=gen) / I**0.5
                baseline_cache[key] = bench(lambda: hf_bf16_moe(x, gu, dn, ids, wts), graph=False, rep=100)
                del gu, dn
            t_bf16 = baseline_cache[key]
            small = hit * 3 * H * I * 4 < 4e9  # the fp32 reference of the hit experts fits comfortably
            for path in paths:
                check = T in CHECK_TOKENS and small
                err = check_error(x, w13, w2, ids, wts, configs, path) if check else float("nan")
                fn = lambda: fused_moe(x, w13, w2, ids, wts, configs=configs, path=path)  # noqa: E731
                graphed = path == "kernel" or ranges == 1
                t_graph = bench(fn, graph=True) if graphed else float("nan")
                t_eager = bench(fn, graph=False)
                t = t_graph if graphed else t_eager
                if path == "kernel":
                    c13, c2 = configs or (get_config(dev_name, E, 2 * I, H, bits, T, k, sms, splittable=False),
                                          get_config(dev_name, E, H, I, bits, T, k, sms))
                    how = f"{config_text(c13)} / {config_text(c2)}"
                else:
                    how = f"{ranges} expert range(s), of which dequantizing {t_dq:.1f} us"
                out(f"| {name} | int{bits} | {T} | {hit} | {path} | {t_graph:.1f} | {t_eager:.1f} | {t_bf16:.1f} | "
                    f"{wbytes / t / 1e3:.0f} | {flops / t / 1e6:.1f} | {fl:.1f} | {t / fl:.2f} | "
                    f"{t_bf16 / t:.2f} | {err:.1e} | {how} |")
        del w13, w2
        torch.cuda.empty_cache()


def sweep_candidates(rows, gemm):
    """Configs to time for one GEMM at this many rows per expert; for the down GEMM the first four
    (and at <= 32 rows the two 32-weight-row tiles, the register-capped, unrolled and q - z tiles, at more
    rows the 128-k tiles of dequantized weights and the first joined ones) are tried with split-K.
    swap: weights as the register MMA operand; int: integer MMA; r: register cap (more programs per SM);
    u: K tiles per loop iteration; sub: integer MMA on q - z; join: one MMA per K tile on the joined int4
    slices."""
    def c(bm, bn, bk, w, st, swap=False, int_mma=False, join=False):
        return GemmConfig(bm, bn, bk, 1, 8, w, st, swap, int_mma, join_slices=join)
    if rows <= 32:
        bm = 16 if rows <= 16 else 32
        base = [c(bm, 128, 128, 4, 4, True, True), c(bm, 64, 128, 4, 4, True, True), c(bm, 128, 128, 4, 4, True),
                c(bm, 128, 64, 4, 4, True, True), c(bm, 256, 128, 8, 4, True, True), c(bm, 128, 128, 4, 3, True, True),
                c(bm, 64, 128, 4, 6, True, True), c(64, 128, 64, 4, 4, False, True),
                c(bm, 32, 128, 4, 4, True, True), c(bm, 32, 128, 2, 4, True, True), c(bm, 64, 128, 2, 4, True, True),
                c(bm, 32, 128, 4, 6, True, True)]
        # 16-row tiles take ~120 registers (4 programs per SM on an H100); capped at 96 (no spills) they
        # fit 5, at 80 (a few spilled) 6 with 3 stages
        capped = [dataclasses.replace(c, max_regs=r, num_stages=st) for c in base[:2] for r, st in ((96, 4), (80, 3))]
        # two K tiles an iteration: their loads issue together (the unrolled 128-row tile takes 142
        # registers uncapped, 3 programs per SM; capped at 128, 4)
        unrolled = [dataclasses.replace(base[0], k_unroll=2, num_stages=st, max_regs=r)
                    for st, r in ((4, None), (3, None), (3, 128))]
        # integer MMA on q - z: no per-group activation sums (2 fewer barriers per K tile in the SASS)
        subbed = [dataclasses.replace(base[i], sub_zero=True) for i in (0, 5, 1)]
        base += capped + unrolled + subbed
        split_too = base[8:10] + capped + unrolled + subbed  # the down GEMM tries these with split-K as well
    elif rows <= 128:
        # the 128-k tiles of dequantized weights are tried with split-K too: an int4 K tile is four MMAs of
        # a quarter of BLOCK_K each (see packing), so 64-k tiles issue MMAs of only 16 k
        k128 = [c(64, 128, 128, 4, 4, True), c(128, 128, 128, 8, 3, True)]
        # joined slices: the dequantized tile is the shared-memory MMA operand (no swap), one wgmma wait per
        # K tile (sm_90 SASS, scripts/sass_report.py: 1 instead of 4 for 128x128x64)
        joined = [c(64, 128, 64, 4, 4, join=True), c(128, 128, 64, 8, 3, join=True), c(64, 256, 64, 8, 3, join=True)]
        split_too = k128 + joined[:2]
        base = [c(64, 128, 64, 4, 4, True), c(64, 128, 64, 4, 4), c(128, 128, 64, 8, 3, True),
                c(128, 128, 64, 4, 4, True), c(64, 256, 64, 8, 3, True), c(128, 128, 64, 8, 3),
                c(64, 128, 128, 4, 4, True, True), c(128, 128, 128, 8, 3, True, True),
                c(32, 128, 128, 4, 4, True, True), *k128, *joined]
    else:
        k128 = [c(256, 128, 128, 8, 3, True), c(256, 128, 128, 8, 2, True), c(128, 128, 128, 8, 3, True),
                c(128, 128, 128, 4, 3, True), c(128, 128, 128, 4, 4, True), c(128, 256, 128, 8, 3, True)]
        # 4-warp joined tiles (128x128x128 swap with 4 warps beat its 8-warp twin by 1.4x at 4096 tokens in run
        # 29, Mixtral gate/up 4598 vs 6358 us): second or third in run 32, never first
        joined = [c(256, 128, 64, 8, 3, join=True), c(128, 128, 64, 8, 3, join=True),
                  c(128, 128, 128, 4, 3, join=True), c(128, 128, 64, 4, 4, join=True),
                  c(256, 128, 64, 8, 4, join=True), c(128, 256, 64, 8, 3, join=True),
                  c(128, 128, 128, 8, 3, join=True), c(256, 128, 128, 8, 2, join=True)]
        split_too = k128[:4] + joined[:4]
        base = [c(128, 128, 64, 8, 3, True), c(256, 128, 64, 8, 3, True), c(128, 128, 128, 8, 3, True, True),
                c(128, 128, 64, 8, 3), c(64, 128, 64, 4, 4), c(128, 128, 64, 8, 3, False, True),
                c(128, 128, 64, 4, 3, True), c(64, 256, 64, 8, 3, True), *k128, *joined]
    if gemm == "down":  # split-K for the first four and, at few rows, the 32-weight-row and capped tiles
        splits = (1, 2, 4, 8) if rows <= 32 else (1, 2)
        base = [dataclasses.replace(c, split_k=s) for c in base[:4] + split_too for s in splits]
    return base


def time_candidates(label, candidates, run):
    """[(us, config)], fastest first, of the function run(config) returns, per candidate; a config that
    cannot compile or launch (shared memory, registers) is reported and left out."""
    res = []
    for cfg in candidates:
        try:
            res.append((bench(run(cfg), rep=30), cfg))
        except Exception as exc:
            out(f"  sweep {label} {config_text(cfg)}: {type(exc).__name__}: {str(exc)[:100]}")
    return sorted(res, key=lambda t: t[0])


def fastest(res, n=3):
    return ", ".join(f"{config_text(c)} {t:.1f}us" for t, c in res[:n])


def run_sweep(name, tokens, bits, gen, best):
    """Time each GEMM alone over candidate configs; prints the best few per (shape, T, gemm) and
    records the best in best[(name, T, bits)] = (gate_up config, down config)."""
    E, H, I, k = SHAPES[name]
    w13 = random_packed(E, 2 * I, H, bits, True, gen)
    w2 = random_packed(E, H, I, bits, False, gen)
    for T in tokens:
        P = T * k
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        h = torch.randn(P, I, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids, wts = routing(T, E, k, gen)
        hit = torch.unique(ids).numel()
        rows = P / min(E, P)
        for gemm, w in (("gate_up", w13), ("down", w2)):
            fl = floor_us(hit, H, I, bits, T, k)[0] * (2 / 3 if gemm == "gate_up" else 1 / 3)

            def run(cfg):  # called within this iteration: gemm and w are this loop's
                r = moe_align_block_size(ids, E, cfg.block_m)
                nb = max_blocks(P, E, cfg.block_m)
                if gemm == "gate_up":
                    c = torch.empty(P, I, device="cuda", dtype=torch.bfloat16)
                    return lambda: _qgemm.launch(x, w, c, cfg, num_rows=P, num_m_blocks=nb,
                                                 epilogue=_qgemm.EPILOGUE_SILU_MUL, a_div=k, routing=r)
                c = torch.zeros(T, H, device="cuda", dtype=torch.float32)
                return lambda: _qgemm.launch(h, w, c, cfg, num_rows=P, num_m_blocks=nb,
                                             epilogue=_qgemm.EPILOGUE_WEIGHTED_SUM, c_div=k,
                                             topk_weights=wts.reshape(-1), routing=r)

            res = time_candidates(f"{name} T={T} {gemm}", sweep_candidates(rows, gemm), run)
            best.setdefault((name, T, bits), {})[gemm] = res[0][1]
            with open(ALL_PATH, "a") as f:
                f.writelines(f"{name} int{bits} T={T} rows={rows:.1f} {gemm} {config_text(cfg)} g{cfg.group_m} "
                             f"{t:.2f}us floor={fl:.2f}\n" for t, cfg in res)
            out(f"| sweep | {name} | int{bits} | {T} | {gemm} | floor {fl:.1f}us | {fastest(res)} |")
    del w13, w2
    torch.cuda.empty_cache()


def tuned_literal(best, best_dense, device_name):
    """Lines of the TUNED dict in configs.py for the sweeps' winners (MoE GEMMs, then dense layers as E = 1)."""
    table = {}
    for (shape, T, bits), cfgs in sorted(best.items()):
        E, H, I, _ = SHAPES[shape]
        table.setdefault((device_name, E, 2 * I, H, bits), {})[T] = cfgs["gate_up"]
        table.setdefault((device_name, E, H, I, bits), {})[T] = cfgs["down"]
    for (N, K, M, bits), cfg in sorted(best_dense.items()):
        table.setdefault((device_name, 1, N, K, bits), {})[M] = cfg
    return [f"    {key!r}: {{{', '.join(f'{T}: {config_literal(cfg)}' for T, cfg in sorted(v.items()))}}},"
            for key, v in table.items()]


def config_literal(cfg):
    """cfg as configs.py writes it: _c(block_m, block_n, block_k, and the fields that differ from _c's defaults)."""
    names = {"split_k": "sk", "group_m": "gm", "num_warps": "w", "num_stages": "s", "swap_ab": "swap",
             "max_regs": "regs", "k_unroll": "unroll", "sub_zero": "sub", "join_slices": "join"}
    default = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k)
    extra = [f"{names.get(f.name, f.name)}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)[3:]
             if getattr(cfg, f.name) != getattr(default, f.name)]
    return f"_c({', '.join([str(cfg.block_m), str(cfg.block_n), str(cfg.block_k), *extra])})"


def random_dense(N, K, bits, gen):
    q = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, device="cuda", generator=gen)
    s = (torch.rand(N, K // GROUP_SIZE, device="cuda", generator=gen) * 0.01 + 0.001).half()
    z = torch.full((N, K // GROUP_SIZE), 1 << (bits - 1), dtype=torch.uint8, device="cuda")
    return pack_linear(q, s, z, bits, GROUP_SIZE)


def dense_candidates(rows):
    """The MoE candidates for this many rows, 64-row tiles and thin 32-row tiles, each with split-K 1-8: a dense
    layer has one expert's worth of output tiles, too few to fill the GPU at tens to hundreds of rows."""
    tiles = [*sweep_candidates(rows, "gate_up")[:4], *sweep_candidates(64, "gate_up")[:2],
             *sweep_candidates(32, "gate_up")[:2]]
    tiles = list(dict.fromkeys(tiles))  # GemmConfig is frozen: drop the repeats at 64 rows
    return [dataclasses.replace(c, split_k=s) for c in tiles for s in (1, 2, 4, 8)]


def run_dense_sweep(bits, tokens, gen, best_dense):
    """Time quant_linear's Triton GEMM over candidate configs per dense shape and row count; records the
    best in best_dense[(N, K, M, bits)]."""
    for N, K in DENSE_SHAPES:
        w = random_dense(N, K, bits, gen)
        for M in tokens:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            res = time_candidates(f"dense {N}x{K} M={M}", dense_candidates(M),
                                  lambda cfg: lambda: quant_linear(x, w, config=cfg, path="kernel"))
            best_dense[(N, K, M, bits)] = res[0][1]
            with open(ALL_PATH, "a") as f:
                f.writelines(f"dense int{bits} {N}x{K} M={M} {config_text(c)} {t:.2f}us\n" for t, c in res)
            out(f"| sweep | dense {N}x{K} | int{bits} | {M} | | | {fastest(res)} |")


def run_dense(bits, tokens, paths, gen, best_dense):
    """quant_linear (each path) vs bf16 F.linear on attention-sized projections; the kernel path runs the
    dense sweep's winner where there is one."""
    for N, K in DENSE_SHAPES:
        w = random_dense(N, K, bits, gen)
        wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        for M in tokens:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = quant_linear_torch(x, w)
            tb = bench(lambda: F.linear(x, wb))
            fl = max(N * K * (bits / 8 + 2 / GROUP_SIZE) / HBM_BPS, 2 * M * N * K / PEAK_FLOPS) * 1e6
            cfg = best_dense.get((N, K, M, bits))
            for path in paths:
                err = ((quant_linear(x, w, config=cfg, path=path).float() - ref).norm() / ref.norm()).item()
                t = bench(lambda: quant_linear(x, w, config=cfg, path=path))
                out(f"| dense | int{bits} | {N}x{K} | {M} | {path} | {t:.1f} | {tb:.1f} | {fl:.1f} | {t / fl:.2f} | "
                    f"{tb / t:.2f} | {err:.1e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 256, 1024, 4096])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--sweep", action="store_true",
                    help="time each GEMM over candidate configs (each of --bits; with --dense the dense layers "
                         "too); the tables then use the best")
    ap.add_argument("--no-moe", action="store_true", help="skip the MoE sweep and table")
    ap.add_argument("--dense", action="store_true", help="also time quant_linear (at the --tokens row counts)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS),
                    help="fused_moe / quant_linear paths to time: the Triton GEMMs, dequantize + vendor GEMM")
    ap.add_argument("--log", type=Path, help="write the printed lines here too")
    ap.add_argument("--sweep-log", type=Path, help="write every sweep timing here")
    ap.add_argument("--configs-of", metavar="DEVICE_NAME",
                    help="use the TUNED entries of this device name (e.g. an H200 running the H100's)")
    args = ap.parse_args()
    global LOG_PATH, ALL_PATH
    LOG_PATH = args.log
    ALL_PATH = args.sweep_log or "/dev/null"
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    name, sms = device_info(torch.device("cuda"))
    if args.configs_of:
        TUNED.update({(name, *key[1:]): table for key, table in list(TUNED.items()) if key[0] == args.configs_of})
        get_config.cache_clear()
    out(f"device: {name}, {sms} SMs; torch {torch.__version__}, triton {triton.__version__}; "
        f"group_size {GROUP_SIZE}, symmetric; bf16 activations"
        + (f"; TUNED entries of {args.configs_of}" if args.configs_of else ""))
    best = {}  # (shape, T, bits) -> {"gate_up": cfg, "down": cfg}; used by the MoE table when --sweep ran
    best_dense = {}  # (N, K, M, bits) -> cfg; used by the dense table when --sweep --dense ran
    if args.sweep:
        out("| sweep | shape | bits | T | gemm | floor | best 3 (config time) |")
        for bits in args.bits:
            for shape in [] if args.no_moe else args.shapes:
                run_sweep(shape, args.tokens, bits, gen, best)
                out(f"  ({time.time() - t0:.0f}s)")
            if args.dense:
                run_dense_sweep(bits, args.tokens, gen, best_dense)
                out(f"  ({time.time() - t0:.0f}s)")
    if best or best_dense:
        out("TUNED entries for triton_kernels/configs.py (this device):")
        for line in tuned_literal(best, best_dense, name):
            out(line)
    if not args.no_moe:
        out("| shape | bits | T | hit | path | fused us (graph) | fused us (eager) | bf16 loop us | GB/s | TFLOP/s "
            "| floor us | time/floor | x bf16 | rel err | configs gate_up / down, or dequant ranges |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        cache = {}
        for shape in args.shapes:
            run_shape(shape, args.tokens, args.bits, args.paths, gen, cache, best)
            out(f"  ({time.time() - t0:.0f}s)")
    if args.dense:
        out("| dense | bits | NxK | M | path | quant_linear us | bf16 F.linear us | floor us | time/floor | x bf16 "
            "| rel err |")
        out("|---|---|---|---|---|---|---|---|---|---|---|")
        for bits in args.bits:
            run_dense(bits, args.tokens, args.paths, gen, best_dense)


if __name__ == "__main__":
    main()
