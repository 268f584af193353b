"""Sensitivity: what each candidate precision of each part of each layer costs, measured cheaply.

A *unit* is the smallest part of a model that a recipe gives one scheme: per decoder layer, attention's
fused q/k/v (MLA: q_a/kv_a) and each other attention projection, the router, the shared-expert gate,
gate/up and down of the shared expert or dense MLP, and the routed experts (all of them, one unit, as
vLLM needs; or gate/up and down; or per expert). For every unit and candidate scheme, the unit alone is
quantized (everything else as stored) from the cached original inputs of its layer, and moeq records

    gptq_error   sum over the unit's tensors of tr(dW H dW^T) per calibration token: squared output error
                 of the unit's own linear maps (not comparable across roles: q/k/v outputs are not o's)
    block_error  mean over calibration tokens of ||layer_q(x) - layer(x)||^2, the decoder layer's output
                 error on the residual stream: one currency for every unit of the layer, routing flips included
    cost         predicted increase of the mean next-token NLL = alpha[layer] * block_error

alpha[layer] converts residual-stream error into loss: one probe per layer quantizes the whole layer at
`probe_scheme` and measures the increase of the NLL on held-out calibration windows (seed + 1), so
alpha = dNLL_probe / block_error_probe. The evaluation text is never used to predict; with `validate`
each unit/candidate trial also runs the evaluation text to the end and records the measured perplexity
increase, which `validation()` compares with the prediction (Spearman rank correlation).
Predicted costs add over units (independent small perturbations: NLL is locally quadratic in them).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moeq.cli import add_calibration_args
from moeq.errors import MoeqError
from moeq.inventory import ModelInventory
from moeq.pipeline import LayerActivations, quantize_layer, run_layer
from moeq.plan import Plan, make_plan
from moeq.recipe import Scheme, build_recipe
from moeq.report import RoutingRecorder

DECIDED_ROLES = ("attn", "router", "router_gate", "expert", "shared_expert", "dense_mlp")
# Projections that vLLM fuses into one linear layer take one scheme: they form one unit.
FUSED = {"attn": (("q", "k", "v"), ("q_a", "kv_a")), "shared_expert": (("gate", "up"),),
         "dense_mlp": (("gate", "up"),), "expert": (("gate", "up"),)}
GRANULARITIES = ("vllm", "proj", "expert")
# tiny-mixtral (benchmarks/autorecipe.md): asymmetric clipped int3 beats symmetric int3 by ~10% in cost
DEFAULT_CANDIDATES = (
    {"bits": 2, "group_size": 64, "sym": False, "clip": True},
    {"bits": 3, "group_size": 128},
    {"bits": 3, "group_size": 128, "sym": False, "clip": True},
    {"bits": 3, "group_size": 64, "sym": False, "clip": True},
    {"bits": 4, "group_size": 128},
    {"bits": 4, "group_size": 128, "sym": False, "clip": True},
    {"bits": 8, "group_size": -1},
)
DEFAULT_CANDIDATES_SPEC = "2:64:asym:clip,3:128,3:128:asym:clip,3:64:asym:clip,4:128,4:128:asym:clip,8:-1"
DEFAULT_FLOORS = {"router": 8, "router_gate": 8}  # routers pick experts: never below int8
PROBE_SCHEME = {"bits": 3, "group_size": 128}


class SensitivityError(MoeqError):
    pass


@dataclass(frozen=True)
class Unit:
    """Tensors of one layer that take one scheme: a role, some of its projections, maybe one expert."""

    layer: int
    role: str
    projs: tuple[str, ...]              # the projections covered; () for routers (they have none)
    expert: int | None                   # one routed expert, or None for all of them
    tensors: tuple[tuple[str, int, int], ...]  # (name, numel, in_features)

    @property
    def key(self) -> str:
        parts = [f"L{self.layer}", self.role] + (["+".join(self.projs)] if self.projs else [])
        return ".".join(parts + ([f"e{self.expert}"] if self.expert is not None else []))

    @property
    def params(self) -> int:
        return sum(n for _, n, _ in self.tensors)

    def stored_bits(self, scheme: Scheme) -> float:
        """Bits the unit takes under `scheme` (scales included), by the plan's own accounting."""
        return sum(n * scheme.bits_per_weight(k) for _, n, k in self.tensors)

    def selector(self, all_projs: bool) -> dict:
        rule: dict = {"layers": self.layer, "role": self.role}
        if self.projs and not all_projs:
            rule["proj"] = list(self.projs) if len(self.projs) > 1 else self.projs[0]
        if self.expert is not None:
            rule["experts"] = self.expert
        return rule


def model_units(inventory: ModelInventory, granularity: str = "vllm") -> list[Unit]:
    """Every decided tensor of the decoder layers, partitioned into units (see module docstring)."""
    if granularity not in GRANULARITIES:
        raise SensitivityError(f"granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    groups: dict[tuple, list] = {}
    for t in inventory.tensors:
        if not t.quantizable or t.layer is None or t.layer >= inventory.num_layers or t.role not in DECIDED_ROLES:
            continue
        proj_group = (t.proj,) if t.proj else ()
        for fused in FUSED.get(t.role, ()):
            if t.proj in fused:
                proj_group = fused
        expert = None
        if t.role == "expert":
            if granularity == "vllm":
                proj_group = ("gate", "up", "down")
            if granularity == "expert":
                expert = t.expert
        groups.setdefault((t.layer, t.role, proj_group, expert), []).append((t.name, t.numel, t.shape[-1]))
    units = []
    for (layer, role, projs, expert), tensors in sorted(groups.items(), key=lambda kv: (
            kv[0][0], DECIDED_ROLES.index(kv[0][1]), kv[0][2], -1 if kv[0][3] is None else kv[0][3])):
        present = {inventory.by_name[name].proj for name, _, _ in tensors}
        units.append(Unit(layer, role, tuple(p for p in projs if p in present), expert, tuple(tensors)))
    return units


def _covers_all(unit: Unit, units: list[Unit]) -> bool:
    """True when no other unit of the same layer and role (and expert) has other projections."""
    return not any(u.layer == unit.layer and u.role == unit.role and u.expert == unit.expert and u != unit
                   for u in units)


@dataclass(frozen=True)
class SensitivityConfig:
    candidates: tuple[dict, ...] = DEFAULT_CANDIDATES
    defaults: dict | None = None         # scheme keys every candidate starts from (the recipe's defaults)
    granularity: str = "vllm"
    probe_scheme: dict | None = None     # whole-layer scheme of the alpha probe (default PROBE_SCHEME)
    validate: bool = False               # also measure the evaluation perplexity of every unit/candidate
    layers: tuple[int, ...] | None = None  # measure only these layers' units (None: all)


@dataclass(frozen=True)
class Measurement:
    unit: str
    candidate: dict                      # scheme keys over the defaults
    bits: float                          # stored bits of the unit under this candidate
    gptq_error: float
    block_error: float
    cost: float                          # predicted dNLL = alpha[layer] * block_error
    agreement: float | None              # routing agreement of the unit's own layer on calibration tokens
    seconds: float
    ppl_increase: float | None = None    # measured on the evaluation text (validate only), percent


@dataclass(frozen=True)
class Sensitivity:
    """Per unit and candidate: bits and predicted cost; per layer: alpha. Serialisable to JSON."""

    model: str
    granularity: str
    defaults: dict
    units: list[Unit]
    alpha: dict[int, float]
    probe: dict[int, dict]               # layer -> {"block_error", "dnll"} of the alpha probe
    measurements: list[Measurement]
    ppl_before: float | None
    nll_before: float

    def by_unit(self) -> dict[str, list[Measurement]]:
        out: dict[str, list[Measurement]] = {u.key: [] for u in self.units}
        for m in self.measurements:
            out[m.unit].append(m)
        return out

    def to_json(self) -> dict:
        return {"model": self.model, "granularity": self.granularity, "defaults": self.defaults,
                "units": [asdict(u) for u in self.units], "alpha": {str(k): v for k, v in self.alpha.items()},
                "probe": {str(k): v for k, v in self.probe.items()},
                "measurements": [asdict(m) for m in self.measurements], "ppl_before": self.ppl_before,
                "nll_before": self.nll_before}

    @classmethod
    def from_json(cls, data: dict) -> "Sensitivity":
        units = [Unit(u["layer"], u["role"], tuple(u["projs"]), u["expert"],
                      tuple(tuple(t) for t in u["tensors"])) for u in data["units"]]
        return cls(data["model"], data["granularity"], data["defaults"], units,
                   {int(k): v for k, v in data["alpha"].items()}, {int(k): v for k, v in data["probe"].items()},
                   [Measurement(**m) for m in data["measurements"]], data["ppl_before"], data["nll_before"])

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Sensitivity":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise SensitivityError(f"{path}: not a moeq sensitivity file ({err})") from None


def unit_plan(inventory: ModelInventory, defaults: dict, rules: list[dict], name: str) -> Plan:
    """The plan of a recipe made of `defaults` and `rules` (every other tensor kept as stored)."""
    return make_plan(inventory, build_recipe({"defaults": dict(defaults), "rules": rules}, name))


def _block_error(out: LayerActivations, ref: LayerActivations) -> float:
    """Mean over tokens of the squared norm of the layer output's change: sum ||dy||^2 / tokens."""
    total, tokens = 0.0, 0
    for y, r in zip(out.batches, ref.batches):
        total += float((y.float() - r.float()).pow(2).sum())
        tokens += y.shape[0] * y.shape[1]
    return total / max(tokens, 1)


def _gptq_error(modules, calib_tokens: int, out_features: dict[str, int]) -> float:
    """Sum over tensors of loss * N * routed tokens / calibration tokens: squared output error per token."""
    return sum(r.loss * out_features[r.name] * r.tokens for r in modules) / max(calib_tokens, 1)


class _Measurer:
    """Quantizes a plan's tensors in one layer from the cache and measures the layer and, optionally, the model."""

    def __init__(self, cache, inventory: ModelInventory):
        self.cache, self.inventory = cache, inventory
        self.out_features = {t.name: t.shape[0] for t in inventory.tensors}
        self.tokens = sum(b.shape[0] * b.shape[1] for b in cache.calib[0].batches)

    def measure(self, plan: Plan, layer_index: int, downstream: bool, evaluate: bool) -> dict:
        cache = self.cache
        layer = cache.load_layer(layer_index)
        entries = [e for e in plan.entries if e.tensor.layer == layer_index]
        modules, _ = quantize_layer(layer, layer_index, entries, plan, cache.calib[layer_index])
        routing, out = RoutingRecorder.record(layer, lambda: run_layer(layer, cache.calib[layer_index]))
        result = {"gptq_error": _gptq_error(modules, self.tokens, self.out_features),
                  "block_error": _block_error(out, cache.calib[layer_index + 1]), "agreement": None}
        if routing is not None:
            result["agreement"] = RoutingRecorder.fraction(cache.calib_routing[layer_index], routing)
        if downstream:
            probe = run_layer(layer, cache.probe[layer_index]) if cache.probe[layer_index] is not None else None
            evals = run_layer(layer, cache.eval[layer_index]) if evaluate else None
            cache.release_layer(layer)
            for i in range(layer_index + 1, self.inventory.num_layers):
                later = cache.load_layer(i)
                probe = run_layer(later, probe) if probe is not None else None
                evals = run_layer(later, evals) if evals is not None else None
                cache.release_layer(later)
            if probe is not None:
                result["dnll"] = cache.probe_nll(probe) - cache.probe_nll_before
            if evals is not None:
                result["ppl_increase"] = 100 * (cache.eval_perplexity(evals) / cache.ppl_before - 1)
        else:
            cache.release_layer(layer)
        return result


def measure_sensitivity(cache, inventory: ModelInventory, config: SensitivityConfig,
                        floors: dict[str, int] | None = None, log=print) -> Sensitivity:
    """Measure every unit under every candidate allowed by `floors` (role -> lowest bits); see the module doc."""
    floors = DEFAULT_FLOORS if floors is None else floors
    if cache.probe[0] is None:
        raise SensitivityError("sensitivity needs held-out probe windows: build the cache with probe_windows > 0")
    defaults = dict(config.defaults or {})
    units = [u for u in model_units(inventory, config.granularity) if config.layers is None or u.layer in config.layers]
    measurer = _Measurer(cache, inventory)
    alpha, probe = {}, {}
    probe_scheme = config.probe_scheme or PROBE_SCHEME
    for i in sorted({u.layer for u in units}):
        rules = [{**u.selector(True), **probe_scheme} for u in units
                 if u.layer == i and u.role not in floors]
        started = time.perf_counter()
        measured = measurer.measure(unit_plan(inventory, defaults, rules, f"probe L{i}"), i, True, False)
        probe[i] = {"block_error": measured["block_error"], "dnll": measured["dnll"]}
        # a probe that does not raise the held-out NLL gives no scale: fall back to the smallest positive one
        alpha[i] = measured["dnll"] / measured["block_error"] if measured["block_error"] > 0 else 0.0
        log(f"probe layer {i}: block error {measured['block_error']:.4g}, dNLL {measured['dnll']:+.5f}, "
            f"alpha {alpha[i]:.4g} ({time.perf_counter() - started:.1f} s)")
    positive = [a for a in alpha.values() if a > 0]
    for i, a in alpha.items():
        if a <= 0:
            alpha[i] = min(positive) if positive else 1.0
    measurements = []
    for unit in units:
        floor = floors.get(unit.role, 0)
        for candidate in config.candidates:
            scheme = build_recipe({"defaults": defaults, "rules": [{"bits": 16, **candidate}]}, "c").rules[0].scheme
            if scheme.bits < floor or scheme.keep:
                continue
            if any(k % scheme.group_size for _, _, k in unit.tensors if scheme.group_size != -1):
                continue  # the group size does not divide this unit's input size: not a candidate here
            started = time.perf_counter()
            rule = {**unit.selector(_covers_all(unit, units)), **candidate}
            measured = measurer.measure(unit_plan(inventory, defaults, [rule], unit.key), unit.layer,
                                        config.validate, config.validate)
            m = Measurement(unit.key, dict(candidate), unit.stored_bits(scheme), measured["gptq_error"],
                            measured["block_error"], alpha[unit.layer] * measured["block_error"],
                            measured["agreement"], time.perf_counter() - started, measured.get("ppl_increase"))
            measurements.append(m)
            log(f"{unit.key} {scheme.label()}: block error {m.block_error:.4g}, cost {m.cost:.3g}"
                + (f", measured {m.ppl_increase:+.3f}%" if m.ppl_increase is not None else "")
                + f" ({m.seconds:.1f} s)")
    return Sensitivity(str(inventory.model_dir), config.granularity, defaults, units, alpha, probe, measurements,
                       cache.ppl_before, cache.probe_nll_before)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def sensitivity_table(sensitivity: Sensitivity) -> str:
    """One row per unit: params, then predicted cost (dNLL) per candidate, measured % where validated."""
    labels = []
    for m in sensitivity.measurements:
        label = _scheme_label(sensitivity.defaults, m.candidate)
        if label not in labels:
            labels.append(label)
    header = ("unit", "params") + tuple(labels)
    rows = [header]
    for key, ms in sensitivity.by_unit().items():
        unit = next(u for u in sensitivity.units if u.key == key)
        cells = {_scheme_label(sensitivity.defaults, m.candidate): f"{m.cost:.2e}"
                 + (f" ({m.ppl_increase:+.2f}%)" if m.ppl_increase is not None else "") for m in ms}
        rows.append((key, f"{unit.params / 1e6:.2f}M") + tuple(cells.get(label, "-") for label in labels))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("cells: predicted NLL increase = alpha[layer] x block output error"
                 + (" (measured perplexity increase on the evaluation text)" if any(
                     m.ppl_increase is not None for m in sensitivity.measurements) else ""))
    lines.append("alpha per layer: " + ", ".join(f"L{k} {v:.3g}" for k, v in sorted(sensitivity.alpha.items())))
    validated = [m for m in sensitivity.measurements if m.ppl_increase is not None]
    if len(validated) >= 3:
        rho = spearman([m.cost for m in validated], [m.ppl_increase for m in validated])
        lines.append(f"Spearman rank correlation, predicted vs measured, over {len(validated)} unit trials: {rho:.3f}")
    return "\n".join(lines)


def _scheme_label(defaults: dict, candidate: dict) -> str:
    return build_recipe({"defaults": defaults, "rules": [{"bits": 16, **candidate}]}, "c").rules[0].scheme.label()


def parse_candidates(spec: str) -> tuple[dict, ...]:
    """'2:64,3:128:asym:clip,8:-1' (BITS:GROUP, then optional asym and clip flags) -> candidate scheme dicts."""
    out = []
    for item in spec.split(","):
        bits, group, *flags = item.strip().split(":") + ([] if ":" in item else ["128"])
        try:
            candidate = {"bits": int(bits), "group_size": int(group)}
        except ValueError:
            raise SensitivityError(f"--candidates {item!r}: write BITS:GROUP[:asym][:clip], e.g. 3:128 or 8:-1") \
                from None
        for flag in flags:
            if flag not in ("asym", "clip"):
                raise SensitivityError(f"--candidates {item!r}: unknown flag {flag!r}; use asym or clip")
            candidate.update({"sym": False} if flag == "asym" else {"clip": True})
        out.append(candidate)
    return tuple(out)


def add_measure_args(p, required: bool = True) -> None:
    """Calibration and candidate arguments shared by `moeq sensitivity` and `moeq autorecipe`."""
    p.add_argument("--recipe", default="base", help="recipe whose `defaults` every candidate starts from "
                   "(sym, act_order, damp, ...; default: base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of that recipe, e.g. defaults.clip=true")
    p.add_argument("--calib", required=required, help="calibration text (.txt, .jsonl, .pt)")
    p.add_argument("--eval", help="evaluation text: with --validate, measure every unit trial's perplexity")
    p.add_argument("--validate", action="store_true", help="also measure the perplexity of every unit trial "
                   "on --eval (slow: runs the rest of the model each time)")
    add_calibration_args(p, calib_samples=32)
    p.add_argument("--probe-windows", type=int, default=16,
                   help="held-out calibration windows (seed + 1) whose NLL scales each layer's cost (default 16)")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES_SPEC,
                   help=f"candidate precisions BITS:GROUP[:asym][:clip] over the recipe's defaults (default "
                        f"{DEFAULT_CANDIDATES_SPEC}; kept is always one)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="proj",
                   help="units: vllm (experts of a layer together), proj (gate/up and down apart; default), "
                        "expert (every expert apart: E times the measurements)")
    p.add_argument("--floor", dest="floors", action="append", default=[], metavar="ROLE=BITS",
                   help="lowest precision of a role (default router=8, router_gate=8)")


def measure_from_args(args, inventory: ModelInventory, floors: dict[str, int]) -> Sensitivity:
    from moeq.recipe import load_recipe
    from moeq.trial import ActivationCache, TrialConfig

    if args.validate and not args.eval:
        raise SensitivityError("--validate needs --eval TEXT")
    defaults = dict(load_recipe(args.recipe, args.overrides).source.get("defaults") or {})
    config = TrialConfig(calib=Path(args.calib), eval=Path(args.eval) if args.validate else None,
                         calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed,
                         eval_windows=args.eval_windows, probe_windows=args.probe_windows,
                         batch_size=args.batch_size, device=args.device, text_field=args.text_field)
    if args.probe_windows < 1:
        raise SensitivityError("--probe-windows must be at least 1: the probes scale every layer's cost")
    cache = ActivationCache(inventory, config)
    return measure_sensitivity(cache, inventory, SensitivityConfig(
        candidates=parse_candidates(args.candidates), defaults=defaults, granularity=args.granularity,
        validate=args.validate), floors)


def add_cli(subparsers) -> None:
    """Register `moeq sensitivity`."""
    p = subparsers.add_parser("sensitivity", help="predicted cost of every candidate precision per layer and role")
    p.add_argument("model", help="model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--out", required=True, help="write the measurements as JSON here (input of moeq autorecipe)")
    add_measure_args(p)
    p.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args) -> None:
    from moeq.autorecipe import parse_floors
    from moeq.inventory import inventory_from_checkpoint

    inventory = inventory_from_checkpoint(args.model)
    sensitivity = measure_from_args(args, inventory, parse_floors(args.floors))
    sensitivity.save(Path(args.out))
    print()
    print(sensitivity_table(sensitivity))
    print(f"sensitivity written to {args.out}")
