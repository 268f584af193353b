"""A quantized checkpoint on the GPU: perplexity against the CPU reference path, and tokens/s against bf16.

    python scripts/bench_model.py QUANTIZED_DIR --original ORIGINAL_DIR --eval eval.txt [--windows 64 --seq-len 512]

Rows: the original bf16 model (transformers), moeq.load on CUDA with the Triton kernels, moeq.load on
CUDA dequantized (kernels=False), and the CPU float32 reference path. Columns: perplexity on the eval
windows, prefill tokens/s (one batch of windows), decode tokens/s (greedy, batch 1 and batch 16, 64 new tokens).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeq
from moeq.calibration import evaluation_windows, read_token_stream
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


def decode_tokens_per_s(model, prompt: torch.Tensor, device, batch: int, new_tokens: int = 64) -> float:
    ids = prompt[:1, :32].repeat(batch, 1).to(device)
    with torch.no_grad():
        for _ in range(2):  # the first run compiles every kernel variant decoding meets; the second is timed
            _sync(device)
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        _sync(device)
    return batch * new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quantized")
    parser.add_argument("--original", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
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
    ]
    for name, make, device in candidates:
        model = make()
        ppl = model_perplexity(model, windows)
        fast = device.type == "cuda"
        rows.append((name, ppl, prefill_tokens_per_s(model, windows[:16], device) if fast else float("nan"),
                     decode_tokens_per_s(model, windows, device, 1) if fast else float("nan"),
                     decode_tokens_per_s(model, windows, device, 16) if fast else float("nan")))
        del model
        torch.cuda.empty_cache()
    reference = rows[-1][1]
    print(f"\n{Path(args.quantized).name} on {torch.cuda.get_device_name()}; eval {windows.shape[0]} x {windows.shape[1]}")
    print(f"{'path':32s} {'ppl':>9s} {'vs cpu ref':>10s} {'prefill tok/s':>13s} {'decode b1':>10s} {'decode b16':>10s}")
    for name, ppl, prefill, d1, d16 in rows:
        print(f"{name:32s} {ppl:9.3f} {100 * (ppl / reference - 1):+9.3f}% {prefill:13.0f} {d1:10.1f} {d16:10.1f}")


if __name__ == "__main__":
    main()
