"""The `moeq` command line. It builds the library's inputs from arguments and prints results; the work
happens in the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeq.errors import MoeqError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe YAML path or built-in name (default: the model family's recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key by dotted path, e.g. defaults.group_size=64 or rules.1.bits=8")
    p.add_argument("--target", choices=["vllm"], help="make recipes vLLM could not serve an error")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeq", description="Quantize Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show what a recipe does to every tensor, with average bits and size")
    p.add_argument("model", help="model folder (config.json + safetensors), or a config.json with --config-only")
    _add_recipe_args(p)
    p.add_argument("--config-only", action="store_true", help="plan from config.json alone (no weights needed)")
    p.add_argument("--json", help="also write the full per-tensor plan as JSON here")
    p.set_defaults(func=cmd_plan)
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
