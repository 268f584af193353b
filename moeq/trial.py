"""Trials: quantize a subset of a model's decoder layers (the rest stay as stored), evaluate, and sweep.

A sweep runs the original model once and keeps, for every decoder layer i, the hidden states of the
calibration and evaluation text entering it (`ActivationCache`); those are exactly the inputs of
"quantize only from layer i on". A trial then starts at its first quantized layer: it quantizes the
layers of its subset sequentially (as `moeq quantize` does: each quantized layer's calibration outputs
feed the next), runs the evaluation text through every later layer (quantized or not) and compares
perplexity and each MoE layer's top-k expert choice with the original model's. Nothing before the
trial's first layer is recomputed, so a per-layer sweep costs about half the layer forwards of
re-running every trial from the embedding.

Memory: the cache holds (L + 1) x (calibration + evaluation + probe tokens) x hidden values in the
compute dtype (float32 on CPU, bf16 on GPU): for tiny-mixtral with 128 x 512 calibration and 64 x 512
evaluation tokens that is 5 x 98,304 x 256 x 4 B = 503 MB. Weights are streamed from the shards one
decoder layer at a time, as in `moeq quantize`; `ActivationCache.bytes` reports the cache's size.
Trials cover decoder layers: lm_head is kept as stored in every trial.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeq.calibration import calibration_windows, evaluation_windows, read_token_stream
from moeq.cli import add_calibration_args
from moeq.errors import MoeqError
from moeq.evaluate import perplexity
from moeq.families import ROLES
from moeq.inventory import ModelInventory
from moeq.pipeline import (LayerActivations, build_skeleton, capture_layer_inputs, compute_dtype, load_layer,
                           load_model_tensor, quantize_layer, run_layer)
from moeq.plan import Plan, make_plan
from moeq.recipe import Recipe, build_recipe
from moeq.report import RoutingRecorder
from moeq.shards import ShardReader


class TrialError(MoeqError):
    pass


@dataclass(frozen=True)
class TrialConfig:
    calib: Path
    eval: Path
    calib_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    eval_windows: int = 64
    probe_windows: int = 0        # held-out calibration windows (seed + 1) for sensitivity probes; 0: none
    batch_size: int = 16          # sequences per forward pass
    device: str = "auto"          # "auto": cuda when present, else cpu
    text_field: str = "text"


@dataclass(frozen=True)
class TrialResult:
    """One trial: which layers were quantized, perplexity before/after, per-layer routing agreement."""

    name: str
    layers: tuple[int, ...]             # decoder layers with at least one quantized tensor
    ppl_before: float
    ppl_after: float
    agreement: dict[int, float]          # MoE layer -> fraction of eval tokens with an unchanged top-k set
    modules: list[dict]                  # per quantized tensor: name, role, layer, expert, tokens, loss, rel_loss, ...
    seconds: float
    probe_nll: float | None = None       # mean next-token NLL on the probe windows, when the cache has them

    @property
    def ppl_increase(self) -> float:
        """Relative perplexity change in percent."""
        return 100 * (self.ppl_after / self.ppl_before - 1)

    def to_json(self) -> dict:
        return {"name": self.name, "layers": list(self.layers), "ppl_before": self.ppl_before,
                "ppl_after": self.ppl_after, "ppl_increase_pct": self.ppl_increase,
                "agreement": {str(k): v for k, v in self.agreement.items()}, "modules": self.modules,
                "seconds": self.seconds, "probe_nll": self.probe_nll}


def _mean_nll(final_hidden: list[torch.Tensor], token_batches: list[torch.Tensor], norm, lm_head) -> float:
    return math.log(perplexity(final_hidden, token_batches, norm, lm_head))


class ActivationCache:
    """The original model's activations entering every decoder layer, computed once for many trials.

    calib[i], eval[i], probe[i]: what layer i receives (i = L: the final hidden states), as LayerActivations.
    routing[i], calib_routing[i]: the original top-k expert sets of MoE layer i on the evaluation and
    calibration text.
    """

    def __init__(self, inventory: ModelInventory, config: TrialConfig, log=print):
        from transformers import AutoTokenizer

        from moeq.quantize import resolve_device

        if config.eval is not None and Path(config.eval).resolve() == Path(config.calib).resolve():
            raise TrialError(f"--eval {config.eval} is the calibration text; evaluate on text calibration never saw")
        self.inventory, self.config = inventory, config
        self.device = resolve_device(config.device)
        self.dtype = compute_dtype(self.device)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(inventory.model_dir)
        calib_stream = read_token_stream(config.calib, tokenizer, config.text_field)
        calib_ids = calibration_windows(calib_stream, config.calib_samples, config.seq_len, config.seed)
        eval_ids = (evaluation_windows(read_token_stream(config.eval, tokenizer, config.text_field),
                                       config.eval_windows, config.seq_len) if config.eval is not None else None)
        probe_ids = (calibration_windows(calib_stream, config.probe_windows, config.seq_len, config.seed + 1)
                     if config.probe_windows else None)
        self.calib_tokens = calib_ids.numel()
        self.eval_batches = list(eval_ids.split(config.batch_size)) if eval_ids is not None else []
        self.probe_batches = list(probe_ids.split(config.batch_size)) if probe_ids is not None else []
        self.reader = ShardReader(inventory)
        # A throwaway plan only names the model-level tensors to load; no recipe rule applies to them here.
        bare = make_plan(inventory, build_recipe({"rules": []}, "bare"))
        self.model = build_skeleton(inventory.config, self.device, self.dtype)
        load_model_tensor(self.model, self.reader, bare, "model.embed_tokens.weight", self.device, self.dtype)
        load_model_tensor(self.model, self.reader, bare, "model.norm.weight", self.device, self.dtype)
        if "lm_head.weight" in inventory.by_name:
            load_model_tensor(self.model, self.reader, bare, "lm_head.weight", self.device, self.dtype)
        else:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        calib = capture_layer_inputs(self.model, list(calib_ids.split(config.batch_size)), self.device)
        evals = capture_layer_inputs(self.model, self.eval_batches, self.device) if self.eval_batches else None
        probe = capture_layer_inputs(self.model, self.probe_batches, self.device) if self.probe_batches else None
        self.calib, self.eval, self.probe, self.routing, self.calib_routing = [calib], [evals], [probe], {}, {}
        for i in range(inventory.num_layers):
            layer = self.load_layer(i)
            if evals is not None:
                routing, evals = RoutingRecorder.record(layer, lambda: run_layer(layer, evals))
                if routing is not None:
                    self.routing[i] = routing
            routing, calib = RoutingRecorder.record(layer, lambda: run_layer(layer, calib))
            if routing is not None:
                self.calib_routing[i] = routing
            probe = run_layer(layer, probe) if probe is not None else None
            self.calib.append(calib)
            self.eval.append(evals)
            self.probe.append(probe)
            self.release_layer(layer)
        self.ppl_before = self.eval_perplexity(evals) if evals is not None else None
        self.probe_nll_before = self.probe_nll(self.probe[-1]) if probe is not None else None
        log(f"activation cache: {self.bytes / 1e6:.0f} MB for {inventory.num_layers + 1} layer inputs "
            f"({calib_ids.numel()} calibration, {eval_ids.numel() if eval_ids is not None else 0} evaluation, "
            f"{probe_ids.numel() if probe_ids is not None else 0} probe tokens)"
            + (f"; perplexity {self.ppl_before:.3f}" if self.ppl_before is not None else "")
            + f"; {time.perf_counter() - started:.1f} s")

    @property
    def bytes(self) -> int:
        acts = [a for per_layer in (self.calib, self.eval, self.probe) for a in per_layer if a is not None]
        return sum(t.numel() * t.element_size() for a in acts for t in a.batches)

    def load_layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i with its stored weights (16-bit weights in the compute dtype, fp32 kept fp32)."""
        return load_layer(self.model, self.reader, i, self.device, self.dtype)

    @staticmethod
    def release_layer(layer: torch.nn.Module) -> None:
        layer.to_empty(device="meta")

    def eval_perplexity(self, final_hidden: LayerActivations) -> float:
        return perplexity(final_hidden.batches, self.eval_batches, self.model.model.norm, self.model.lm_head)

    def probe_nll(self, final_hidden: LayerActivations) -> float:
        return _mean_nll(final_hidden.batches, self.probe_batches, self.model.model.norm, self.model.lm_head)


def quantized_layers(plan: Plan) -> tuple[int, ...]:
    return tuple(sorted({e.tensor.layer for e in plan.entries if e.scheme is not None and e.tensor.layer is not None
                         and e.tensor.layer < plan.inventory.num_layers}))


def run_trial(cache: ActivationCache, plan: Plan, name: str = "") -> TrialResult:
    """Quantize `plan`'s decoder layers starting from the cached original inputs of its first one, then
    run the evaluation text through every later layer; perplexity and routing agreement against the cache."""
    started = time.perf_counter()
    if cache.eval[0] is None:
        raise TrialError("a trial needs evaluation text: build the cache with an eval file")
    layers = quantized_layers(plan)
    if not layers:
        raise TrialError(f"trial {name or plan.recipe.name}: the plan quantizes no decoder-layer tensor")
    calib, evals, probe = cache.calib[layers[0]], cache.eval[layers[0]], cache.probe[layers[0]]
    modules, agreement = [], {}
    for i in range(layers[0], plan.inventory.num_layers):
        layer = cache.load_layer(i)
        if i in layers:
            entries = [e for e in plan.entries if e.tensor.layer == i]
            results, calib = quantize_layer(layer, i, entries, plan, calib)
            modules += [{k: v for k, v in r.__dict__.items() if k != "quantized"} for r in results]
        elif i < layers[-1]:  # calibration inputs are needed only up to the last quantized layer
            calib = run_layer(layer, calib)
        routing, evals = RoutingRecorder.record(layer, lambda: run_layer(layer, evals))
        if routing is not None:
            agreement[i] = RoutingRecorder.fraction(cache.routing[i], routing)
        probe = run_layer(layer, probe) if probe is not None else None
        cache.release_layer(layer)
    return TrialResult(name, layers, cache.ppl_before, cache.eval_perplexity(evals), agreement, modules,
                       time.perf_counter() - started, cache.probe_nll(probe) if probe is not None else None)


def restricted_recipe(recipe: Recipe, layers: set[int] | None = None, roles: set[str] | None = None,
                      num_layers: int = 0) -> Recipe:
    """`recipe` plus last rules that keep every tensor outside `layers` and `roles` (and lm_head) as stored."""
    extra = [{"role": "lm_head", "bits": 16}]
    if layers is not None:
        extra.append({"layers": sorted(set(range(num_layers)) - set(layers)), "bits": 16})
    if roles is not None:
        extra.append({"role": [r for r in ROLES if r not in roles], "bits": 16})
    tree = {**recipe.source, "rules": list(recipe.source.get("rules") or []) + extra}
    return build_recipe(tree, recipe.name)


def trial_plan(plan: Plan, layers: set[int] | None = None, roles: set[str] | None = None) -> Plan:
    """The plan `moeq plan` would print for the recipe restricted to `layers` and `roles`."""
    recipe = restricted_recipe(plan.recipe, layers, roles, plan.inventory.num_layers)
    return make_plan(plan.inventory, recipe)


def sweep_plans(plan: Plan, sweep: str | None, layers: set[int] | None = None) -> list[tuple[str, Plan]]:
    """(name, plan) per trial: one over `layers` (all when None), or one per layer / per quantized role."""
    if sweep is None:
        label = "all layers" if layers is None else "layers " + ",".join(map(str, sorted(layers)))
        return [(label, trial_plan(plan, layers))]
    if sweep == "layers":
        chosen = sorted(layers) if layers is not None else range(plan.inventory.num_layers)
        return [(f"layer {i}", trial_plan(plan, {i})) for i in chosen if quantized_layers(trial_plan(plan, {i}))]
    if sweep == "role":
        roles = sorted({e.tensor.role for e in plan.entries if e.scheme is not None and e.tensor.layer is not None})
        return [(f"role {r}", trial_plan(plan, layers, {r})) for r in roles]
    raise TrialError(f"--sweep {sweep!r}: use layers or role")


def trial_table(results: list[TrialResult]) -> str:
    """One row per trial: perplexity change, mean/worst relative loss, lowest routing agreement."""
    header = ("trial", "layers", "ppl", "delta", "mean rel loss", "worst rel loss", "min agreement", "time s")
    rows = [header]
    for r in results:
        rel = [m["rel_loss"] for m in r.modules]
        worst = min(r.agreement.items(), key=lambda kv: kv[1]) if r.agreement else None
        rows.append((r.name, ",".join(map(str, r.layers)), f"{r.ppl_after:.3f}", f"{r.ppl_increase:+.2f}%",
                     f"{statistics.fmean(rel):.2e}", f"{max(rel):.2e}",
                     f"L{worst[0]} {worst[1]:.1%}" if worst else "-", f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if results:
        lines.append(f"original perplexity {results[0].ppl_before:.3f}")
    return "\n".join(lines)


def per_layer(results: list[TrialResult], num_layers: int) -> dict[str, list]:
    """Per-layer series for the plot: mean relative loss, routing agreement, tokens per expert [L, E]."""
    loss = [[] for _ in range(num_layers)]
    tokens: dict[tuple[int, int], int] = {}
    for r in results:
        for m in r.modules:
            loss[m["layer"]].append(m["rel_loss"])
            if m["role"] == "expert":
                tokens[(m["layer"], m["expert"])] = m["tokens"]
    experts = 1 + max((e for _, e in tokens), default=-1)
    heat = [[tokens.get((i, e), 0) for e in range(experts)] for i in range(num_layers)]
    agreement = [min((r.agreement[i] for r in results if i in r.agreement), default=math.nan)
                 for i in range(num_layers)]
    return {"rel_loss": [statistics.fmean(v) if v else math.nan for v in loss], "agreement": agreement,
            "tokens": heat}


def plot_trials(results: list[TrialResult], num_layers: int, path: Path) -> None:
    """PNG: PPL increase per trial, mean relative loss per layer, tokens per expert (layer x expert heatmap)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrialError("--plot needs matplotlib: pip install 'moeq[plot]' (or pip install matplotlib)") from None
    series = per_layer(results, num_layers)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar([r.name for r in results], [r.ppl_increase for r in results], color="tab:red")
    axes[0].set_ylabel("perplexity increase (%)")
    axes[0].set_title("PPL increase per trial")
    axes[0].tick_params(axis="x", rotation=45)
    axes[1].plot(range(num_layers), series["rel_loss"], marker="o", label="mean relative loss")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("layer")
    axes[1].set_xticks(range(num_layers))
    axes[1].set_title("GPTQ relative loss per layer")
    twin = axes[1].twinx()
    twin.plot(range(num_layers), series["agreement"], marker="s", color="tab:green", label="routing agreement")
    twin.set_ylabel("routing agreement (min over trials)")
    image = axes[2].imshow(series["tokens"], aspect="auto", cmap="viridis")
    axes[2].set_xlabel("expert")
    axes[2].set_ylabel("layer")
    axes[2].set_yticks(range(num_layers))
    axes[2].set_title("calibration tokens per expert")
    fig.colorbar(image, ax=axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_layers(spec: str | None, num_layers: int) -> set[int] | None:
    """'0-3', '5', '-2:' or '0,2,4' (moeq's index syntax) -> a set of layer indices; None stays None."""
    if spec is None:
        return None
    from moeq.recipe import index_set

    chosen = index_set([s.strip() for s in spec.split(",")], num_layers)
    if not chosen:
        raise TrialError(f"--layers {spec!r} names no layer of this model (it has {num_layers})")
    return chosen


def add_cli(subparsers) -> None:
    """Register `moeq trial`."""
    p = subparsers.add_parser("trial", help="quantize a subset of layers (rest kept), evaluate; sweep layers or roles")
    add_run_args(p)
    p.add_argument("--layers", help="layers to quantize: 0-3, 5, -2: or 0,2,4 (default: all)")
    p.add_argument("--sweep", choices=["layers", "role"], help="one trial per layer or per quantized role, "
                   "reusing the original activations")
    p.add_argument("--plot", help="write a PNG (PPL increase per trial, loss per layer, tokens per expert)")
    p.add_argument("--json", help="write every trial's numbers as JSON here")
    p.set_defaults(func=cmd_trial)


def add_run_args(p: argparse.ArgumentParser, eval_required: bool = True) -> None:
    """Model, recipe, calibration and evaluation arguments shared by trial, sensitivity and autorecipe."""
    p.add_argument("model", help="model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--recipe", help="recipe YAML path or built-in name (default: the model family's recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key by dotted path")
    p.add_argument("--calib", required=True, help="calibration text (.txt, .jsonl, .pt)")
    p.add_argument("--eval", required=eval_required, help="evaluation text (never the calibration text)")
    add_calibration_args(p)


def config_from_args(args, **changes) -> TrialConfig:
    return TrialConfig(calib=Path(args.calib), eval=Path(args.eval) if args.eval else None,
                       calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed,
                       eval_windows=args.eval_windows, batch_size=args.batch_size, device=args.device,
                       text_field=args.text_field, **changes)


def plan_from_args(args, target: str | None = None) -> Plan:
    from moeq.inventory import inventory_from_checkpoint
    from moeq.recipe import load_recipe

    inventory = inventory_from_checkpoint(args.model)
    name = args.recipe or {"deepseek": "deepseek_v3"}.get(inventory.family.name, inventory.family.name)
    return make_plan(inventory, load_recipe(name, args.overrides), target=target)


def cmd_trial(args) -> None:
    plan = plan_from_args(args)
    plans = sweep_plans(plan, args.sweep, parse_layers(args.layers, plan.inventory.num_layers))
    cache = ActivationCache(plan.inventory, config_from_args(args))
    results = []
    for name, trial in plans:
        results.append(run_trial(cache, trial, name))
        print(f"{name}: ppl {results[-1].ppl_after:.3f} ({results[-1].ppl_increase:+.2f}%)", flush=True)
    print()
    print(trial_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=1))
        print(f"trials written to {args.json}")
    if args.plot:
        plot_trials(results, plan.inventory.num_layers, Path(args.plot))
        print(f"plot written to {args.plot}")

