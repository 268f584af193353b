"""Autorecipe: the per-unit precision that minimises predicted damage at a given average bit budget.

Budget: the average stored bits per weight (scales and zero points included, `Scheme.bits_per_weight`)
over the *decided* weights: every linear weight of the decoder layers that a recipe may quantize
(attention, routers and router gates, routed experts, shared experts, dense MLPs), counting a kept tensor
at its stored width (16 for bf16) and routers at the precision their floor leaves them. Embeddings and
lm_head are outside it (kept as stored, as in every built-in recipe): `budget_bits(plan)` computes it
from the plan, so it is the number `moeq plan` would give over those tensors.

Choice: each unit (moeq.sensitivity) takes one option: a measured candidate scheme or kept; the
predicted damage of a recipe is the sum of its units' costs (predicted NLL increase). Minimising it
under the budget is a multiple-choice knapsack. `choose` solves it greedily on each unit's lower convex
hull of (bits, cost), taking upgrades by decreasing cost saved per bit. Why that is good enough: the same
order, with the first upgrade that does not fit taken fractionally, is the optimum of the LP relaxation
(Sinha & Zoltners 1979), a lower bound on every recipe from these candidates within the budget; the
greedy result is at most that one fractional upgrade's saving above the bound, and `Choice.bound` reports
it so the gap is shown, not assumed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from moeq.errors import MoeqError
from moeq.inventory import DTYPE_BITS, ModelInventory
from moeq.plan import Plan, VLLM_MOE_BITS, make_plan
from moeq.recipe import Scheme, build_recipe, load_recipe
from moeq.sensitivity import DECIDED_ROLES, DEFAULT_FLOORS, Measurement, Sensitivity, Unit


PROJ_ORDER = ("q", "k", "v", "q_a", "kv_a", "q_b", "kv_b", "o", "gate", "up", "down")


class AutorecipeError(MoeqError):
    pass


def budget_bits(plan: Plan) -> float:
    """Average stored bits per weight over the decoder layers' linear weights (see the module docstring):
    the figure `moeq plan` prints as the autorecipe budget."""
    if not any(e.tensor.quantizable and e.tensor.layer is not None for e in plan.entries):
        raise AutorecipeError(f"{plan.inventory.model_dir}: no decoder-layer linear weight to budget")
    return plan.totals()["avg_bits_layers"]


@dataclass(frozen=True)
class Option:
    candidate: dict | None     # scheme keys over the defaults; None: kept as stored
    bits: float                # stored bits of the unit
    cost: float                # predicted NLL increase
    label: str
    measured: float | None = None  # measured perplexity increase (%), when the sensitivity was validated


@dataclass(frozen=True)
class Choice:
    units: list[Unit]
    options: list[list[Option]]      # per unit, sorted by bits
    picked: list[int]                # per unit, index into options
    params: int
    budget: float
    bound: float                     # LP-relaxation lower bound on the predicted damage

    @property
    def bits(self) -> float:
        return sum(o[i].bits for o, i in zip(self.options, self.picked)) / self.params

    @property
    def cost(self) -> float:
        return sum(o[i].cost for o, i in zip(self.options, self.picked))


def _kept_bits(unit: Unit, inventory: ModelInventory | None) -> float:
    if inventory is None:
        return 16.0 * unit.params
    return sum(n * DTYPE_BITS.get(inventory.by_name[name].dtype, 16) for name, n, _ in unit.tensors)


def unit_options(sensitivity: Sensitivity, target: str | None = None, floors: dict[str, int] | None = None,
                 inventory: ModelInventory | None = None) -> tuple[list[Unit], list[list[Option]]]:
    """Units and their options. target="vllm": routed experts of a layer merge into one unit at 4 or 8 bits
    and routers stay kept; merged costs and bits are the sums of the measured parts (costs add)."""
    floors = DEFAULT_FLOORS if floors is None else floors
    measured = sensitivity.by_unit()
    groups: dict[tuple, list[Unit]] = {}
    for u in sensitivity.units:
        merge = target == "vllm" and u.role == "expert"
        groups.setdefault((u.layer, u.role) + (() if merge else (u.projs, u.expert)), []).append(u)
    units, options = [], []
    for parts in groups.values():
        projs = sorted({p for u in parts for p in u.projs}, key=lambda p: (p not in PROJ_ORDER, PROJ_ORDER.index(p)
                                                                              if p in PROJ_ORDER else p))
        unit = parts[0] if len(parts) == 1 else Unit(parts[0].layer, parts[0].role, tuple(projs), None,
                                                     tuple(t for u in parts for t in u.tensors))
        by_candidate: dict[str, list[Measurement]] = {}
        for part in parts:
            for m in measured[part.key]:
                by_candidate.setdefault(json.dumps(m.candidate, sort_keys=True), []).append(m)
        opts = [Option(None, _kept_bits(unit, inventory), 0.0, "kept", 0.0)]
        for key, ms in by_candidate.items():
            candidate = json.loads(key)
            scheme = _scheme(sensitivity.defaults, candidate)
            if len(ms) != len(parts) or scheme.bits < floors.get(unit.role, 0):
                continue
            if target == "vllm" and (unit.role in ("router", "router_gate")
                                     or (unit.role == "expert" and scheme.bits not in VLLM_MOE_BITS)):
                continue
            validated = [m.ppl_increase for m in ms]
            opts.append(Option(candidate, sum(m.bits for m in ms), sum(m.cost for m in ms), scheme.label(),
                               validated[0] if len(ms) == 1 and validated[0] is not None else None))
        units.append(unit)
        options.append(sorted(opts, key=lambda o: (o.bits, o.cost)))
    return units, options


def _scheme(defaults: dict, candidate: dict) -> Scheme:
    return build_recipe({"defaults": defaults, "rules": [{"bits": 16, **candidate}]}, "candidate").rules[0].scheme


def _hull(opts: list[Option]) -> list[int]:
    """Indices of the lower convex hull of (bits, cost), from fewest bits: each step saves cost per bit
    at a falling rate. Options with more bits and no less cost than another are never on it."""
    hull: list[int] = []
    for i in sorted(range(len(opts)), key=lambda i: (opts[i].bits, opts[i].cost)):
        if hull and opts[i].cost >= opts[hull[-1]].cost:
            continue  # dominated: more bits, no less damage
        while len(hull) >= 2:
            a, b = opts[hull[-2]], opts[hull[-1]]
            # b is above the segment a -> i: not convex, drop it
            if (b.cost - a.cost) * (opts[i].bits - a.bits) >= (opts[i].cost - a.cost) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def choose(units: list[Unit], options: list[list[Option]], budget: float) -> Choice:
    """Greedy multiple-choice knapsack on convex hulls, with the LP-relaxation bound (module docstring)."""
    params = sum(u.params for u in units)
    capacity = budget * params
    hulls = [_hull(o) for o in options]
    picked = [h[0] for h in hulls]
    used = sum(o[i].bits for o, i in zip(options, picked))
    if used > capacity * (1 + 1e-12):
        raise AutorecipeError(f"budget {budget:.3f} bits/weight is below the least any allowed recipe takes "
                              f"({used / params:.3f}: every unit at its fewest bits, floors and target honoured)")
    # every hull step, by decreasing saving per bit; within a unit the rate falls, so the order is feasible
    steps = sorted(((options[u][h[k]].cost - options[u][h[k + 1]].cost)
                    / (options[u][h[k + 1]].bits - options[u][h[k]].bits), u, k)
                   for u, h in enumerate(hulls) for k in range(len(h) - 1))
    steps.reverse()
    position = [0] * len(units)
    cost = sum(o[i].cost for o, i in zip(options, picked))
    bound = None
    for rate, u, k in steps:
        if position[u] != k:
            continue  # an earlier step of this unit did not fit, so neither can this one
        a, b = options[u][hulls[u][k]], options[u][hulls[u][k + 1]]
        extra = b.bits - a.bits
        if used + extra <= capacity:
            used += extra
            cost -= a.cost - b.cost
            picked[u], position[u] = hulls[u][k + 1], k + 1
        elif bound is None:
            # LP relaxation: this step taken fractionally is the continuous optimum
            bound = cost - (a.cost - b.cost) * (capacity - used) / extra
    choice = Choice(units, options, picked, params, budget, cost if bound is None else bound)
    return _improve(choice, capacity)


def _improve(choice: Choice, capacity: float) -> Choice:
    """Single moves and pairwise swaps (one unit up, one down) that cut predicted damage within the budget."""
    picked = list(choice.picked)
    options = choice.options
    used = sum(o[i].bits for o, i in zip(options, picked))
    improved = True
    while improved:
        improved = False
        best = (0.0, None)
        for u, opts in enumerate(options):
            for j, o in enumerate(opts):
                gain = opts[picked[u]].cost - o.cost
                extra = o.bits - opts[picked[u]].bits
                if gain > best[0] + 1e-15 and used + extra <= capacity:
                    best = (gain, [(u, j)])
                if gain <= 0 or extra <= 0:
                    continue
                for v, vopts in enumerate(options):
                    if v == u:
                        continue
                    for k, p in enumerate(vopts):
                        loss = p.cost - vopts[picked[v]].cost
                        room = p.bits - vopts[picked[v]].bits
                        if gain - loss > best[0] + 1e-15 and used + extra + room <= capacity:
                            best = (gain - loss, [(u, j), (v, k)])
        if best[1]:
            for u, j in best[1]:
                used += options[u][j].bits - options[u][picked[u]].bits
                picked[u] = j
            improved = True
    return Choice(choice.units, options, picked, choice.params, choice.budget, min(choice.bound, choice.cost))


def recipe_rules(choice: Choice) -> list[tuple[dict, str]]:
    """(rule, comment) per unit: the rule gives the chosen scheme, the comment every option's cost."""
    rules = []
    for unit, opts, picked in zip(choice.units, choice.options, choice.picked):
        siblings = [u for u in choice.units if u.layer == unit.layer and u.role == unit.role and u is not unit]
        rule = unit.selector(all_projs=not siblings)
        chosen = opts[picked]
        rule.update(chosen.candidate if chosen.candidate is not None else {"bits": 16})
        costs = ", ".join(("*" if i == picked else "") + f"{o.label} {o.bits / unit.params:.2f}b {o.cost:.2e}"
                          + (f" (measured {o.measured:+.2f}%)" if o.measured is not None and o.candidate else "")
                          for i, o in enumerate(opts))
        rules.append((rule, f"{unit.key} ({unit.params / 1e6:.2f}M): {costs}"))
    return rules


def write_recipe(choice: Choice, sensitivity: Sensitivity, family: str, path: Path, source: str) -> str:
    """The chosen recipe as YAML, with comments giving each unit's options and predicted costs."""
    predicted = 100 * math.expm1(min(choice.cost, 50.0))
    lines = [
        f"# moeq autorecipe for {sensitivity.model} (from {source})",
        f"# budget {choice.budget:.3f} bits/weight over the decoder layers' linear weights (attention, routers,",
        f"# experts, shared experts, dense MLPs; scales included; lm_head and embeddings not counted): "
        f"this recipe takes {choice.bits:.3f}",
        f"# predicted damage: sum of unit costs = {choice.cost:.4g} NLL (+{predicted:.2f}% perplexity on held-out "
        f"calibration text)",
        f"# optimality: greedy on convex hulls; no recipe from these candidates within the budget can predict "
        f"less than {choice.bound:.4g} (LP bound; gap {choice.cost - choice.bound:.2g})",
        "# cost = alpha[layer] x block output error; alpha per layer: "
        + ", ".join(f"L{k} {v:.3g}" for k, v in sorted(sensitivity.alpha.items())),
        "# each comment: unit (params): option bits/weight predicted-dNLL; * = chosen",
        "",
    ]
    tree = {"family": family,
            "description": f"autorecipe at {choice.budget:g} bits/weight ({choice.bits:.3f} used)",
            "defaults": sensitivity.defaults}
    lines.append(yaml.safe_dump(tree, sort_keys=False, default_flow_style=None).rstrip())
    lines.append("rules:")
    for rule, comment in recipe_rules(choice):
        lines.append(f"  # {comment}")
        lines.append("  - " + yaml.safe_dump(rule, sort_keys=False, default_flow_style=True, width=10_000).strip())
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text


def autorecipe(sensitivity: Sensitivity, inventory: ModelInventory, budget: float, out: Path,
               target: str | None = None, floors: dict[str, int] | None = None,
               source: str = "sensitivity") -> tuple[Choice, Plan]:
    """Choose, write the YAML to `out`, and plan it back: the plan's budget bits must be the chosen ones."""
    units, options = unit_options(sensitivity, target, floors, inventory)
    choice = choose(units, options, budget)
    write_recipe(choice, sensitivity, inventory.family.name, out, source)
    plan = make_plan(inventory, load_recipe(Path(out).resolve()), target=target)
    planned = budget_bits(plan)
    if not math.isclose(planned, choice.bits, rel_tol=1e-9):
        raise AutorecipeError(f"{out}: plans to {planned:.6f} bits/weight but the choice counted {choice.bits:.6f}; "
                              "the sensitivity file does not match this model")
    return choice, plan


def parse_floors(items: list[str]) -> dict[str, int]:
    """ROLE=BITS items over the defaults (routers never below int8)."""
    floors = dict(DEFAULT_FLOORS)
    for item in items:
        role, _, bits = item.partition("=")
        if role not in DECIDED_ROLES or not bits.isdigit():
            raise AutorecipeError(f"--floor {item!r}: write ROLE=BITS with ROLE one of {', '.join(DECIDED_ROLES)}")
        floors[role] = int(bits)
    return floors


def add_cli(subparsers) -> None:
    """Register `moeq autorecipe`."""
    from moeq.sensitivity import add_measure_args

    p = subparsers.add_parser("autorecipe", help="choose per-module precision under an average-bits budget")
    p.add_argument("model", help="model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--budget", type=float, required=True,
                   help="average bits/weight over the decoder layers' linear weights, scales included")
    p.add_argument("--sensitivity", help="a `moeq sensitivity --out` file (else measured now: needs --calib)")
    p.add_argument("--out", required=True, help="recipe YAML to write")
    p.add_argument("--target", choices=["vllm"], help="stay servable by vLLM (one 4/8-bit scheme per MoE layer)")
    add_measure_args(p, required=False)
    p.set_defaults(func=cmd_autorecipe)


def cmd_autorecipe(args) -> None:
    from moeq.inventory import inventory_from_checkpoint
    from moeq.plan import render_plan
    from moeq.sensitivity import measure_from_args

    inventory = inventory_from_checkpoint(args.model)
    floors = parse_floors(args.floors)
    if args.sensitivity:
        sensitivity, source = Sensitivity.load(Path(args.sensitivity)), args.sensitivity
    else:
        if not args.calib:
            raise AutorecipeError("give --sensitivity FILE or --calib TEXT to measure it now")
        sensitivity, source = measure_from_args(args, inventory, floors), "measured now"
    choice, plan = autorecipe(sensitivity, inventory, args.budget, Path(args.out), args.target, floors, source)
    print(render_plan(plan))
    print(f"budget bits (decoder-layer linear weights): {budget_bits(plan):.3f} <= {args.budget}")
    print(f"predicted damage {choice.cost:.4g} NLL (+{100 * math.expm1(choice.cost):.2f}% perplexity); "
          f"LP lower bound {choice.bound:.4g}")
    print(f"recipe written to {args.out}")
