"""A random-weight checkpoint with the layer shapes of a real MoE model, for runtime benchmarks at real sizes.

    python scripts/make_synthetic_model.py OUT --shape mixtral --layers 2 --tokenizer TOKENIZER_DIR [--device cuda]

Decoder layers take their shapes from bench_quantize_layer.SHAPES (Mixtral-8x7B, Qwen3-30B-A3B); the
vocabulary and tokenizer come from TOKENIZER_DIR (e.g. a small fixture), so the embedding and lm_head are
smaller than the real model's. Weights are transformers' random initialisation (normal, std 0.02): a
perplexity measured on this model means nothing, a speed does. Then, e.g.:

    python -m moeq quantize OUT --recipe uniform-int4 --calib calib.txt --out OUT-int4 --device cuda
    python scripts/bench_model.py OUT-int4 --original OUT --eval eval.txt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize_layer import SHAPES  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a model folder whose tokenizer to use")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; pick a new folder")
    source = json.loads((args.tokenizer / "config.json").read_text())
    shape = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, num_hidden_layers=args.layers,
                                  vocab_size=source["vocab_size"], max_position_embeddings=4096,
                                  **{k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source})
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).is_file():
            shutil.copy(args.tokenizer / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {args.shape}-shaped, {args.layers} layers, {params / 1e9:.2f}B parameters (bf16)")


if __name__ == "__main__":
    main()
