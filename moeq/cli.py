"""The `moeq` command line. It builds the library's inputs from arguments and prints results; the work
happens in the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeq.checkpoint import OUTPUT_FORMATS
from moeq.errors import MoeqError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe YAML path or built-in name (default: the model family's recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key by dotted path, e.g. defaults.group_size=64 or rules.1.bits=8")
    p.add_argument("--target", choices=["vllm"], help="make recipes vLLM could not serve an error")


def add_calibration_args(p: argparse.ArgumentParser, calib_samples: int = 128) -> None:
    """How calibration and evaluation text is windowed and run: shared by quantize, trial and sensitivity."""
    p.add_argument("--calib-samples", type=int, default=calib_samples,
                   help=f"calibration windows (default {calib_samples})")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    p.add_argument("--eval-windows", type=int, default=64, help="evaluation windows (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")


def _plan_for(model: str, recipe: str | None, overrides: list[str], target: str | None, config_only: bool):
    from moeq.inventory import inventory_from_checkpoint, inventory_from_config
    from moeq.plan import make_plan
    from moeq.recipe import load_recipe

    inventory = inventory_from_config(model) if config_only else inventory_from_checkpoint(model)
    recipe_name = recipe or default_recipe_name(inventory.family.name)
    return make_plan(inventory, load_recipe(recipe_name, overrides), target=target)


def default_recipe_name(family: str) -> str:
    return {"deepseek": "deepseek_v3"}.get(family, family)


def cmd_plan(args) -> None:
    from moeq.plan import render_plan

    plan = _plan_for(args.model, args.recipe, args.overrides, args.target, args.config_only)
    print(render_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=1))
        print(f"plan written to {args.json}")


def cmd_quantize(args) -> None:
    from moeq.plan import render_plan
    from moeq.quantize import QuantizeConfig, quantize_model

    plan = _plan_for(args.model, args.recipe, args.overrides, args.target, config_only=False)
    print(render_plan(plan))
    config = QuantizeConfig(
        calib=Path(args.calib), out=Path(args.out), eval=Path(args.eval) if args.eval else None,
        calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, eval_windows=args.eval_windows,
        batch_size=args.batch_size, device=args.device, text_field=args.text_field, resume=args.resume,
        force=args.force, format=args.format, pad_intermediate_to=args.pad_intermediate_to,
    )
    report = quantize_model(plan, config)
    print()
    print(report.table())
    if not args.no_generate:
        from moeq.evaluate import greedy_generations, load_for_generation

        model, tokenizer = load_for_generation(args.out, args.device)
        for g in greedy_generations(model, tokenizer):
            print(f"{'DEGENERATE ' if g.degenerate else ''}generate {g.prompt!r} -> {g.text!r}")
    print(f"checkpoint: {args.out} (report: {Path(args.out) / 'moeq.json'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeq", description="Quantize Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show what a recipe does to every tensor, with average bits and size")
    p.add_argument("model", help="model folder (config.json + safetensors), or a config.json with --config-only")
    _add_recipe_args(p)
    p.add_argument("--config-only", action="store_true", help="plan from config.json alone (no weights needed)")
    p.add_argument("--json", help="also write the full per-tensor plan as JSON here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quantize", help="quantize a model layer by layer and write the checkpoint")
    p.add_argument("model", help="model folder (config.json + safetensors + tokenizer)")
    _add_recipe_args(p)
    p.add_argument("--calib", required=True, help="calibration text: .txt, .jsonl (text field) or pre-tokenized .pt")
    p.add_argument("--eval", help="evaluation text for perplexity before/after (never the calibration text)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    add_calibration_args(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run from OUT.partial")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="gptq",
                   help="checkpoint format: gptq (default), compressed-tensors, or dequantized bf16 weights")
    p.add_argument("--pad-intermediate-to", type=int, metavar="N",
                   help="zero-pad the routed experts' intermediate size to N so every tensor-parallel shard holds "
                        "whole groups (exact; config.json is updated)")
    p.add_argument("--no-generate", action="store_true", help="skip the greedy generation check")
    p.set_defaults(func=cmd_quantize)

    from moeq import autorecipe, inspect, sensitivity, trial

    for module in (inspect, trial, sensitivity, autorecipe):
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoeqError as err:
        print(f"moeq: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
