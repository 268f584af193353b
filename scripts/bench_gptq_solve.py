"""Time one batched GPTQ solve (moeq.gptq.gptq_quantize) per expert-layer shape and print a table.

CPU: the fixtures' shapes (tiny-mixtral, tiny-qwen2-moe, demo-mixtral). CUDA, when available: Mixtral-8x7B
and Qwen3-30B-A3B expert layers, with peak GPU memory of the solve (beyond its inputs W and H).

    python scripts/bench_gptq_solve.py                 # CPU shapes, plus CUDA shapes if a GPU is visible
    python scripts/bench_gptq_solve.py --device cuda --bits 4 --group-size 128 --no-act-order
"""

from __future__ import annotations

import argparse
import time

import torch

from moeq.gptq import gptq_quantize
from moeq.quant_format import QuantFormat

# (name, E, N, K): W [E, N, K] is the stacked expert weight, K the input features
CPU_SHAPES = [
    ("demo-mixtral gate_up", 8, 512, 128),
    ("demo-mixtral down", 8, 128, 256),
    ("tiny-mixtral gate_up", 8, 1024, 256),
    ("tiny-mixtral down", 8, 256, 512),
    ("tiny-qwen2-moe gate_up", 16, 512, 256),
    ("tiny-qwen2-moe down", 16, 256, 256),
    ("tiny-mixtral q_proj (dense)", 1, 256, 256),
]
CUDA_SHAPES = [
    ("Mixtral-8x7B gate_up", 8, 2 * 14336, 4096),
    ("Mixtral-8x7B down", 8, 4096, 14336),
    ("Qwen3-30B-A3B gate_up", 128, 2 * 768, 2048),
    ("Qwen3-30B-A3B down", 128, 2048, 768),
]


def make_problem(E: int, N: int, K: int, device, seed: int = 0):
    """W bf16 [E, N, K] and a correlated, full-rank mean Hessian H float32 [E, K, K]: low rank plus diagonal,
    built without materialising a [T, K] activation matrix (K = 14336 would not fit)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rank = min(K, 1024)
    B = torch.randn(E, K, rank, generator=gen, device=device) / rank ** 0.5
    H = torch.bmm(B, B.transpose(1, 2))
    del B
    H.diagonal(dim1=-2, dim2=-1).add_(0.05 + torch.rand(E, K, generator=gen, device=device))
    W = (torch.randn(E, N, K, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    return W, H


def time_solve(W, H, fmt, act_order, repeat):
    """(best seconds, peak bytes allocated by the solve beyond W and H (CUDA only), result)."""
    cuda = W.is_cuda
    best, peak, result = float("inf"), 0, None
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = gptq_quantize(W, H, fmt, act_order=act_order)
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        best = min(best, time.perf_counter() - start)
    return best, peak, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--no-act-order", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="CPU runs per shape (best is reported)")
    args = parser.parse_args()
    fmt = QuantFormat(args.bits, args.group_size, sym=not args.asym)
    act_order = not args.no_act_order

    runs = []
    if args.device in ("all", "cpu"):
        runs += [("cpu", shape, args.repeat) for shape in CPU_SHAPES]
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            runs += [("cuda", shape, 1) for shape in CUDA_SHAPES]
        elif args.device == "cuda":
            raise SystemExit("--device cuda: no CUDA device is visible")

    print(f"format: int{fmt.bits} group {fmt.group_size} {'sym' if fmt.sym else 'asym'}, act_order={act_order}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    header = f"{'device':6} {'layer':30} {'E':>4} {'N':>6} {'K':>6} {'solve s':>9} {'ms/expert':>10} " \
             f"{'peak GiB':>9} {'H GiB':>7} {'rel_loss':>9}"
    print(header)
    print("-" * len(header))
    warmed = False
    for device, (name, E, N, K), repeat in runs:
        W, H = make_problem(E, N, K, device)
        if device == "cuda" and not warmed:  # cuSOLVER / cuBLAS handles and kernels load on first use
            gptq_quantize(W[:1, :128, :256].contiguous(), H[:1, :256, :256].contiguous(), fmt, act_order=act_order)
            torch.cuda.synchronize()
            warmed = True
        seconds, peak, result = time_solve(W, H, fmt, act_order, repeat)
        peak_text = f"{peak / 2**30:9.2f}" if device == "cuda" else f"{'-':>9}"
        print(f"{device:6} {name:30} {E:4d} {N:6d} {K:6d} {seconds:9.3f} {1e3 * seconds / E:10.1f} {peak_text} "
              f"{H.numel() * 4 / 2**30:7.2f} {float(result.rel_loss.mean()):9.2e}", flush=True)
        del W, H, result
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
