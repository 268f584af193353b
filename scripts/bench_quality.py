"""Quality benchmark: perplexity on ../shared/data/eval.txt after quantizing the ../shared fixtures.

Setting (issue 3): int4 group 128 on routed experts and attention (uniform-int4 recipe: routers, shared
expert gate and lm_head kept), 128 x 512 calibration tokens from calib.txt (seed 0 unless --seeds), perplexity
on the first 64 windows of 512 tokens of eval.txt, float32 on the CPU. One row per variant and seed; with
several seeds, a mean row per variant (a calibration seed moves these numbers by ~0.05 PPL).

    python scripts/bench_quality.py [--models tiny-mixtral tiny-qwen2-moe] [--variants gptq-sym rtn-sym ...]
                                    [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from moeq.inventory import inventory_from_checkpoint
from moeq.plan import make_plan
from moeq.quantize import QuantizeConfig, quantize_model
from moeq.recipe import load_recipe

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"

# variant name -> recipe overrides on top of uniform-int4; every switch is set explicitly
def _variant(method="gptq", sym=True, clip=False, agq=False, act=True):
    return [f"defaults.method={method}", f"defaults.sym={str(sym).lower()}", f"defaults.clip={str(clip).lower()}",
            f"defaults.gate_weighted={str(agq).lower()}", f"defaults.act_order={str(act).lower()}"]


VARIANTS = {
    "rtn-asym": _variant("rtn", sym=False),
    "rtn-sym": _variant("rtn"),
    "gptq-sym": _variant(),
    "gptq-sym-noact": _variant(act=False),
    "gptq-asym": _variant(sym=False),
    "gptq-sym-clip": _variant(clip=True),
    "gptq-sym-agq": _variant(agq=True),
    "gptq-sym-clip-agq": _variant(clip=True, agq=True),           # the built-in recipes' default
    "gptq-asym-clip": _variant(sym=False, clip=True),
    "gptq-asym-agq": _variant(sym=False, agq=True),
    "gptq-asym-clip-agq": _variant(sym=False, clip=True, agq=True),
}


def run(model: str, variant: str, seed: int, out_root: Path) -> dict:
    plan = make_plan(inventory_from_checkpoint(SHARED / "fixtures" / model),
                     load_recipe("uniform-int4", VARIANTS[variant]))
    config = QuantizeConfig(calib=SHARED / "data" / "calib.txt", eval=SHARED / "data" / "eval.txt",
                            out=out_root / f"{model}-{variant}-{seed}", calib_samples=128, seq_len=512,
                            eval_windows=64, device="cpu", seed=seed)
    started = time.perf_counter()
    report = quantize_model(plan, config, log=lambda *a: None)
    return {"model": model, "variant": variant, "seed": seed, "before": report.perplexity["before"],
            "after": report.perplexity["after"], "seconds": time.perf_counter() - started,
            "agreement": min(report.agreement.values()) if report.agreement else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen2-moe"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration sampling seeds")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for variant in args.variants:
                for seed in args.seeds:
                    rows.append(run(model, variant, seed, Path(tmp)))
                    r = rows[-1]
                    print(f"{r['model']:15s} {r['variant']:18s} seed {seed} ppl {r['before']:.3f} -> {r['after']:.3f}",
                          flush=True)
    print()
    print(f"{'model':15s} {'variant':18s} {'seed':>4s} {'bf16 ppl':>9s} {'quant ppl':>9s} {'delta':>7s} "
          f"{'min route agr':>13s} {'time s':>7s}")
    for (model, variant), runs in itertools.groupby(rows, key=lambda r: (r["model"], r["variant"])):
        runs = list(runs)
        for r in runs:
            delta = 100 * (r["after"] / r["before"] - 1)
            print(f"{model:15s} {variant:18s} {r['seed']:4d} {r['before']:9.3f} {r['after']:9.3f} {delta:+6.2f}% "
                  f"{r['agreement']:13.1%} {r['seconds']:7.1f}")
        if len(runs) > 1:
            before, after = runs[0]["before"], sum(r["after"] for r in runs) / len(runs)
            delta = 100 * (after / before - 1)
            print(f"{model:15s} {variant:18s} {'mean':>4s} {before:9.3f} {after:9.3f} {delta:+6.2f}%")


if __name__ == "__main__":
    main()
