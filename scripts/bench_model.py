"""A quantized checkpoint on the GPU: perplexity against the CPU reference path, and tokens/s against bf16.

    python scripts/bench_model.py QUANTIZED_DIR --original ORIGINAL_DIR --eval eval.txt [--windows 64 --seq-len 512]
        [--no-cpu]

Rows: the original bf16 model (transformers), moeq.load on CUDA with the Triton kernels, moeq.load on
CUDA dequantized (kernels=False), and the CPU float32 reference path. Columns: perplexity on the eval
windows, prefill tokens/s (one batch of windows), steady-state decode tokens/s (greedy, batch 1 and batch 16,
distinct 32-token prompts: the time of 160 new tokens minus that of 32, median of 3, so prefill and set-up
cancel out) with transformers' generate and with moeq.decode.greedy_generate, whose decode step is one CUDA
graph replay.
A row whose step cannot be captured shows n/a, and the reason is printed under the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeq
from moeq.calibration import evaluation_windows, read_token_stream
from moeq.decode import greedy_generate
from moeq.errors import GraphCaptureError
from moeq.evaluate import model_perplexity


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill_tokens_per_s(model, windows: torch.Tensor, device) -> float:
    ids = windows.to(device)
    with torch.no_grad():
        model(input_ids=ids[:2])
        _sync(device)
        started = time.perf_counter()
        for _ in range(3):
            model(input_ids=ids)
        _sync(device)
    return 3 * ids.numel() / (time.perf_counter() - started)


def hf_generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def decode_tokens_per_s(generate, prompt: torch.Tensor, device, batch: int, short: int = 32, long: int = 160,
                        repeats: int = 3) -> float:
    """Steady-state decode rate: generate(ids [batch, 32] from `batch` windows of prompt, n) timed for
    n = short and n = long new tokens, batch * (long - short) / (t_long - t_short), so prefill, warm-up steps
    and graph capture cancel out;
    the median over `repeats` pairs (set-up times vary by tens of ms between calls)."""
    ids = prompt[:batch, :32].to(device)  # distinct prompts: identical rows would all route to the same experts

    def seconds(n: int) -> float:
        _sync(device)
        started = time.perf_counter()
        generate(ids, n)
        _sync(device)
        return time.perf_counter() - started

    with torch.no_grad():
        seconds(long)  # compiles every kernel variant decoding meets
        elapsed = statistics.median(seconds(long) - seconds(short) for _ in range(repeats))
    return batch * (long - short) / elapsed


def _cell(value: float | None) -> str:
    return f"{'n/a':>10s}" if value is None else f"{value:10.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quantized")
    parser.add_argument("--original", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU reference row (large models)")
    args = parser.parse_args()
    if args.windows < 16:
        parser.error("--windows must be at least 16: the batch-16 decode takes 16 distinct windows as prompts")
    windows = evaluation_windows(read_token_stream(args.eval, AutoTokenizer.from_pretrained(args.quantized)),
                                 args.windows, args.seq_len)
    cuda = torch.device("cuda")
    rows = []
    candidates = [
        ("bf16 original (transformers)", lambda: AutoModelForCausalLM.from_pretrained(
            args.original, dtype=torch.bfloat16).to(cuda).eval(), cuda),
        ("moeq.load cuda, Triton kernels", lambda: moeq.load(args.quantized, "cuda"), cuda),
        ("moeq.load cuda, dequantized", lambda: moeq.load(args.quantized, "cuda", kernels=False), cuda),
        ("moeq.load cpu fp32 reference", lambda: moeq.load(args.quantized, "cpu"), torch.device("cpu")),
    ][:3 if args.no_cpu else 4]
    failures = []
    for name, make, device in candidates:
        model = make()
        ppl = model_perplexity(model, windows)
        if device.type != "cuda":
            rows.append((name, ppl) + (float("nan"),) * 5)
            continue
        prefill = prefill_tokens_per_s(model, windows[:16], device)
        decode = [decode_tokens_per_s(partial(hf_generate, model), windows, device, b) for b in (1, 16)]
        try:
            graph = [decode_tokens_per_s(partial(greedy_generate, model), windows, device, b) for b in (1, 16)]
        except GraphCaptureError as err:
            graph = [None, None]
            failures.append(f"{name}: {err}")
        rows.append((name, ppl, prefill, *decode, *graph))
        del model
        torch.cuda.empty_cache()
    reference = float("nan") if args.no_cpu else rows[-1][1]
    print(f"\n{Path(args.quantized).name} on {torch.cuda.get_device_name()}; eval {windows.shape[0]} x {windows.shape[1]}")
    print(f"{'path':32s} {'ppl':>9s} {'vs cpu ref':>10s} {'prefill tok/s':>13s} {'decode b1':>10s} {'decode b16':>10s} "
          f"{'graph b1':>10s} {'graph b16':>10s}")
    for name, ppl, prefill, d1, d16, g1, g16 in rows:
        print(f"{name:32s} {ppl:9.3f} {100 * (ppl / reference - 1):+9.3f}% {prefill:13.0f} {d1:10.1f} {d16:10.1f} "
              f"{_cell(g1)} {_cell(g16)}")
    for line in failures:
        print(f"n/a: {line}")


if __name__ == "__main__":
    main()
