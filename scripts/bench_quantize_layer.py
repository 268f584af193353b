"""Seconds per decoder layer and peak memory of moeq's quantization pipeline on real-sized MoE layers.

Synthetic layers (random weights, std 0.02) with the shapes of Mixtral-8x7B (E8, H4096, I14336, top-2)
and Qwen3-30B-A3B (E128, H2048, I768, top-8), int4 g128 GPTQ on attention and experts (uniform-int4),
calibrated on 128 x 2048 tokens (random token ids through a random embedding). Times one layer's
quantize_layer: hook passes, Hessians, batched solves and the outputs that are the next layer's inputs.
Reading a layer from disk is not included (it is I/O bound: bytes of the layer over disk speed).

    python scripts/bench_quantize_layer.py [--device cuda] [--shapes mixtral qwen3] [--samples 128 --seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from moeq.inventory import inventory_from_config
from moeq.pipeline import build_skeleton, capture_layer_inputs, compute_dtype, quantize_layer
from moeq.plan import make_plan
from moeq.recipe import load_recipe

SHAPES = {
    "mixtral": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
              "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
              "num_experts_per_tok": 8, "norm_topk_prob": True},
    "tiny": {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
             "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2},
}
LAYERS_IN_MODEL = {"mixtral": 32, "qwen3": 48, "tiny": 4}


def bench(shape: str, device: torch.device, samples: int, seq_len: int, batch: int) -> dict:
    config = {**SHAPES[shape], "num_hidden_layers": 1, "vocab_size": 4096, "torch_dtype": "bfloat16",
              "max_position_embeddings": seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        inventory = inventory_from_config(Path(tmp) / "config.json")
    plan = make_plan(inventory, load_recipe("uniform-int4"))
    dtype = compute_dtype(device)
    model = build_skeleton(inventory.config, device, dtype)
    torch.manual_seed(0)
    model.model.embed_tokens.to_empty(device=device)
    layer = model.model.layers[0]
    layer.to_empty(device=device)
    with torch.no_grad():
        for p in list(model.model.embed_tokens.parameters()) + list(layer.parameters()):
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    layer.requires_grad_(False)
    ids = torch.randint(0, 4096, (samples, seq_len))
    acts = capture_layer_inputs(model, list(ids.split(batch)), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results, _ = quantize_layer(layer, 0, list(plan.entries), plan, acts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"shape": shape, "tokens": samples * seq_len, "seconds": done - started,
            "peak_gib": peak, "tensors": len(results), "layers": LAYERS_IN_MODEL[shape],
            "worst_rel_loss": max(r.rel_loss for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3"], choices=list(SHAPES))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench(s, device, args.samples, args.seq_len, args.batch) for s in args.shapes]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}; calibration {args.samples} x {args.seq_len} tokens; int4 g128 GPTQ (uniform-int4)")
    print(f"{'shape':8s} {'tensors':>7s} {'s/layer':>8s} {'peak GiB':>8s} {'model est.':>10s} {'worst rel loss':>14s}")
    for r in rows:
        print(f"{r['shape']:8s} {r['tensors']:7d} {r['seconds']:8.2f} {r['peak_gib']:8.1f} "
              f"{r['seconds'] * r['layers'] / 60:8.1f} min {r['worst_rel_loss']:14.3g}")


if __name__ == "__main__":
    main()
