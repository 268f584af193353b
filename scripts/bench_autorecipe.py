"""Autorecipe benchmark: perplexity of recipes chosen under a bit budget against hand-written ones.

Setting (the quality benchmark's): every recipe is quantized by `quantize_model` with 128 x 512 calibration
tokens from ../shared/data/calib.txt (seed 0) and evaluated on the first 64 windows of 512 tokens of
../shared/data/eval.txt, float32 on the CPU. The sensitivity that autorecipe reads is measured first on
calibration text only (32 x 512 calibration windows, 16 held-out probe windows with seed 1); with
--validate every unit trial also runs the evaluation text, to report how well predicted cost ranks
measured perplexity increase (Spearman). Budget = average stored bits per weight over the decoder
layers' linear weights (moeq.autorecipe.budget_bits).

    python scripts/bench_autorecipe.py [--models tiny-mixtral] [--budgets 3.0 3.5 4.0 5.0] [--validate]
                                       [--sensitivity-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from moeq.autorecipe import autorecipe, budget_bits
from moeq.inventory import inventory_from_checkpoint
from moeq.plan import make_plan
from moeq.quantize import QuantizeConfig, quantize_model
from moeq.recipe import build_recipe, load_recipe
from moeq.sensitivity import (DEFAULT_CANDIDATES_SPEC, Sensitivity, SensitivityConfig, measure_sensitivity,
                              parse_candidates, sensitivity_table, spearman)
from moeq.trial import ActivationCache, TrialConfig

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"  # --shared overrides
BUDGETS = (3.0, 3.5, 4.0, 5.0)

# Hand-written recipes: what an engineer would try at these sizes (scheme keys over base's defaults).
_EXPERTS_AND_ATTN = ["attn", "expert", "shared_expert", "dense_mlp"]
HAND_WRITTEN = {
    "uniform int4 g128": [{"role": _EXPERTS_AND_ATTN, "bits": 4}],
    "uniform int3 g128": [{"role": _EXPERTS_AND_ATTN, "bits": 3}],
    "uniform int3 g64": [{"role": _EXPERTS_AND_ATTN, "bits": 3, "group_size": 64}],
    "experts int3, attn int4": [{"role": _EXPERTS_AND_ATTN, "bits": 4}, {"role": "expert", "bits": 3}],
    "experts int3, attn int8": [{"role": _EXPERTS_AND_ATTN, "bits": 8, "group_size": -1},
                                {"role": "expert", "bits": 3}],
    "experts int3, first+last layer int4": [{"role": _EXPERTS_AND_ATTN, "bits": 4},
                                            {"role": "expert", "layers": "1:-1", "bits": 3}],
    "experts int2 g64, attn int4": [{"role": _EXPERTS_AND_ATTN, "bits": 4},
                                    {"role": "expert", "bits": 2, "group_size": 64}],
    "experts int2 g64 in middle layers, else int3": [{"role": _EXPERTS_AND_ATTN, "bits": 3},
                                                     {"role": "expert", "layers": "1:-1", "bits": 2, "group_size": 64}],
    "experts int4, attn int8": [{"role": _EXPERTS_AND_ATTN, "bits": 8, "group_size": -1},
                                {"role": "expert", "bits": 4}],
    "uniform int4 g64": [{"role": _EXPERTS_AND_ATTN, "bits": 4, "group_size": 64}],
    "uniform int4 g128 asym clip": [{"role": _EXPERTS_AND_ATTN, "bits": 4, "sym": False, "clip": True}],
    "experts int3 asym clip, attn int8": [{"role": _EXPERTS_AND_ATTN, "bits": 8, "group_size": -1},
                                          {"role": "expert", "bits": 3, "sym": False, "clip": True}],
}


def quantize(plan, out: Path) -> tuple[float, float, float]:
    """(perplexity before, after, seconds) of a whole `quantize_model` run in the benchmark's setting."""
    config = QuantizeConfig(calib=SHARED / "data" / "calib.txt", eval=SHARED / "data" / "eval.txt", out=out,
                            calib_samples=128, seq_len=512, eval_windows=64, device="cpu", force=True,
                            format="dequantized")
    report = quantize_model(plan, config, log=lambda *a: None)
    return report.perplexity["before"], report.perplexity["after"], report.seconds


def sensitivity_for(model: str, inventory, validate: bool, candidates, log) -> Sensitivity:
    cache = ActivationCache(inventory, TrialConfig(
        calib=SHARED / "data" / "calib.txt", eval=SHARED / "data" / "eval.txt" if validate else None,
        calib_samples=32, seq_len=512, eval_windows=64, probe_windows=16, device="cpu"), log=log)
    defaults = dict(load_recipe("base").source["defaults"])
    return measure_sensitivity(cache, inventory, SensitivityConfig(candidates=candidates, defaults=defaults,
                                                                   granularity="proj", validate=validate), log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral"])
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    parser.add_argument("--validate", action="store_true", help="measure every unit trial's eval perplexity too")
    parser.add_argument("--sensitivity-dir", help="read MODEL.sensitivity.json from here instead of measuring")
    parser.add_argument("--hand", nargs="*", default=list(HAND_WRITTEN), help="hand-written recipes to run")
    parser.add_argument("--out", help="keep sensitivity JSON and recipes here")
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES_SPEC,
                        help="candidate precisions for the sensitivity, BITS:GROUP[:asym][:clip]")
    parser.add_argument("--shared", help="the fixtures and data folder (default ../shared)")
    args = parser.parse_args()
    global SHARED
    SHARED = Path(args.shared) if args.shared else SHARED
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    out_root.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    defaults = dict(load_recipe("base").source["defaults"])
    rows = []
    for model in args.models:
        inventory = inventory_from_checkpoint(SHARED / "fixtures" / model)
        started = time.perf_counter()
        if args.sensitivity_dir:
            sensitivity = Sensitivity.load(Path(args.sensitivity_dir) / f"{model}.sensitivity.json")
        else:
            sensitivity = sensitivity_for(model, inventory, args.validate, parse_candidates(args.candidates), log)
            sensitivity.save(out_root / f"{model}.sensitivity.json")
        log(f"{model}: sensitivity in {time.perf_counter() - started:.0f} s\n{sensitivity_table(sensitivity)}\n")
        validated = [m for m in sensitivity.measurements if m.ppl_increase is not None]
        if validated:
            for name, pick in (("predicted cost", lambda m: m.cost), ("GPTQ error", lambda m: m.gptq_error),
                               ("block error", lambda m: m.block_error)):
                rho = spearman([pick(m) for m in validated], [m.ppl_increase for m in validated])
                log(f"{model}: Spearman({name}, measured eval PPL increase) over {len(validated)} unit trials: "
                    f"{rho:.3f}")
        for budget in args.budgets:
            path = out_root / f"{model}-auto-{budget:g}.yaml"
            choice, plan = autorecipe(sensitivity, inventory, budget, path)
            before, after, seconds = quantize(plan, out_root / "ckpt")
            rows.append({"model": model, "recipe": f"autorecipe {budget:g}", "budget": budget,
                         "bits": budget_bits(plan), "before": before, "after": after, "seconds": seconds,
                         "predicted": 100 * math.expm1(choice.cost)})
            log(f"{model} autorecipe {budget:g}: {rows[-1]['bits']:.3f} bits, ppl {before:.3f} -> {after:.3f}")
        for name in args.hand:
            tree = {"defaults": defaults, "rules": HAND_WRITTEN[name]}
            plan = make_plan(inventory, build_recipe(tree, name))
            before, after, seconds = quantize(plan, out_root / "ckpt")
            rows.append({"model": model, "recipe": name, "budget": None, "bits": budget_bits(plan),
                         "before": before, "after": after, "seconds": seconds, "predicted": None})
            log(f"{model} {name}: {rows[-1]['bits']:.3f} bits, ppl {before:.3f} -> {after:.3f}")
    print()
    print("| model | recipe | bits/weight | PPL | increase | predicted | time s |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["bits"])):
        predicted = f"+{r['predicted']:.2f}%" if r["predicted"] is not None else "-"
        print(f"| {r['model']} | {r['recipe']} | {r['bits']:.3f} | {r['after']:.3f} | "
              f"{100 * (r['after'] / r['before'] - 1):+.2f}% | {predicted} | {r['seconds']:.0f} |")
    print()
    print("| model | budget | autorecipe bits | autorecipe PPL | best hand-written within budget | its bits "
          "| its PPL |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for budget in args.budgets:
            auto = next(r for r in rows if r["model"] == model and r["budget"] == budget)
            hand = [r for r in rows if r["model"] == model and r["budget"] is None and r["bits"] <= budget + 1e-9]
            best = min(hand, key=lambda r: r["after"]) if hand else None
            print(f"| {model} | {budget:g} | {auto['bits']:.3f} | {auto['after']:.3f} | "
                  + (f"{best['recipe']} | {best['bits']:.3f} | {best['after']:.3f} |" if best else "none | - | - |"))


if __name__ == "__main__":
    main()
