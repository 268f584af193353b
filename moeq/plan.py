"""A plan: the recipe resolved against a model's tensor inventory, before any compute.

For every tensor it says what happens (a Scheme, or kept as stored) and which rule decided; it
checks what only the model can tell (group size against each module's input size, rules that
match nothing, what vLLM could not serve) and it counts parameters, average bits and size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import groupby

from moeq.errors import RecipeError
from moeq.inventory import DTYPE_BITS, ModelInventory, TensorInfo
from moeq.recipe import Recipe, Scheme

# vLLM fuses these projections into one linear layer, which takes one scheme.
VLLM_FUSED = (("attn", ("q", "k", "v")), ("attn", ("q_a", "kv_a")),
              ("dense_mlp", ("gate", "up")), ("shared_expert", ("gate", "up")))
VLLM_MOE_BITS = (4, 8)  # vLLM's GPTQ/compressed-tensors MoE kernels (Marlin) take these


@dataclass(frozen=True)
class TensorPlan:
    tensor: TensorInfo
    scheme: Scheme | None      # None: kept as stored
    rule: int | None           # index of the deciding recipe rule

    @property
    def bits_per_weight(self) -> float:
        if self.scheme is None:
            return DTYPE_BITS.get(self.tensor.dtype, 16)
        return self.scheme.bits_per_weight(self.tensor.shape[-1])


@dataclass(frozen=True)
class Plan:
    inventory: ModelInventory
    recipe: Recipe
    entries: tuple[TensorPlan, ...]
    warnings: tuple[str, ...]

    def scheme_of(self, name: str) -> Scheme | None:
        return self.by_name[name].scheme

    @cached_property
    def by_name(self) -> dict[str, TensorPlan]:
        return {e.tensor.name: e for e in self.entries}

    def totals(self) -> dict[str, float]:
        """Parameter counts, average bits and bytes; `model_*` leave out layers transformers never loads."""
        num_layers = self.inventory.num_layers
        in_model = [e for e in self.entries if e.tensor.layer is None or e.tensor.layer < num_layers]
        quantized = [e for e in self.entries if e.scheme is not None]
        linear = [e for e in in_model if e.tensor.quantizable]
        layer_linear = [e for e in linear if e.tensor.layer is not None]
        params = sum(e.tensor.numel for e in self.entries)
        bits = sum(e.tensor.numel * e.bits_per_weight for e in self.entries)
        linear_params = sum(e.tensor.numel for e in linear)
        return {
            "params": params,
            "model_params": sum(e.tensor.numel for e in in_model),
            "quantized_params": sum(e.tensor.numel for e in quantized),
            "avg_bits": bits / params,
            "avg_bits_linear": sum(e.tensor.numel * e.bits_per_weight for e in linear) / max(linear_params, 1),
            # what `moeq autorecipe --budget` counts: decoder-layer linear weights (no embed / lm_head)
            "avg_bits_layers": sum(e.tensor.numel * e.bits_per_weight for e in layer_linear)
            / max(sum(e.tensor.numel for e in layer_linear), 1),
            "bytes": bits / 8,
            "bf16_bytes": params * 2,
        }

    def to_json(self) -> dict:
        return {
            "model": str(self.inventory.model_dir) if self.inventory.model_dir else None,
            "family": self.inventory.family.name,
            "recipe": self.recipe.source,
            "totals": self.totals(),
            "warnings": list(self.warnings),
            "tensors": [
                {"name": e.tensor.name, "shape": list(e.tensor.shape), "dtype": e.tensor.dtype,
                 "role": e.tensor.role, "proj": e.tensor.proj, "layer": e.tensor.layer, "expert": e.tensor.expert,
                 "scheme": None if e.scheme is None else e.scheme.__dict__, "rule": e.rule,
                 "bits_per_weight": e.bits_per_weight}
                for e in self.entries
            ],
        }


def make_plan(inventory: ModelInventory, recipe: Recipe, target: str | None = None) -> Plan:
    """Resolve `recipe` for every tensor of `inventory`. target="vllm" turns vLLM warnings into errors."""
    if recipe.family and recipe.family != inventory.family.name:
        raise RecipeError(f"recipe {recipe.name} is for family {recipe.family!r} but the model is "
                          f"{inventory.family.name!r}; pick a {inventory.family.name} recipe or drop `family:`")
    entries, used = [], set()
    for tensor in inventory.tensors:
        scheme, rule = None, None
        if tensor.quantizable:
            scheme, rule = recipe.scheme_for(tensor, inventory.num_layers, inventory.num_experts)
            used.add(rule)
            if scheme is not None and scheme.keep:
                scheme = None
        if scheme is not None and scheme.group_size != -1 and tensor.shape[-1] % scheme.group_size:
            raise RecipeError(f"{recipe.rules[rule].where}: group_size {scheme.group_size} does not divide the "
                              f"input size {tensor.shape[-1]} of {tensor.module}; use a divisor of it or -1")
        entries.append(TensorPlan(tensor, scheme, rule))
    notes = [f"{r.where} matches no tensor of this model" for i, r in enumerate(recipe.rules) if i not in used]
    vllm = _vllm_problems(entries)
    if vllm and target == "vllm":
        raise RecipeError("vLLM could not serve this recipe:\n  " + "\n  ".join(vllm))
    notes += [f"vLLM: {p}" for p in vllm]
    return Plan(inventory, recipe, tuple(entries), tuple(notes))


def _vllm_problems(entries: list[TensorPlan]) -> list[str]:
    """What vLLM's fused MoE and merged linear layers cannot load: one message per offending group."""
    problems = []
    by_layer_role = {}
    for e in entries:
        if e.tensor.layer is not None and e.tensor.quantizable:
            by_layer_role.setdefault((e.tensor.layer, e.tensor.role), []).append(e)

    def storage(e):
        return ("kept",) if e.scheme is None else e.scheme.storage

    for (layer, role), group in sorted(by_layer_role.items()):
        if role == "expert":
            kinds = {storage(e) for e in group}
            if len(kinds) > 1:
                problems.append(f"layer {layer}: its experts mix schemes {sorted(map(str, kinds))}; vLLM's fused "
                                "MoE takes one scheme for all experts and gate/up/down of a layer")
            bits = {e.scheme.bits for e in group if e.scheme is not None}
            if bits - set(VLLM_MOE_BITS):
                problems.append(f"layer {layer}: experts at {sorted(bits)} bits; vLLM's MoE kernels take "
                                f"{' or '.join(map(str, VLLM_MOE_BITS))} bits")
        if role == "router" and any(e.scheme is not None for e in group):
            problems.append(f"layer {layer}: the router is quantized; vLLM builds MoE routers unquantized")
        for fused_role, projs in VLLM_FUSED:
            members = [e for e in group if role == fused_role and e.tensor.proj in projs]
            if len({storage(e) for e in members}) > 1:
                problems.append(f"layer {layer}: {role} {'/'.join(projs)} differ in scheme; vLLM fuses them "
                                "into one layer with one scheme")
    return problems


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _layer_ranges(layers: list[int]) -> str:
    out = []
    for _, run in groupby(enumerate(layers), key=lambda p: p[1] - p[0]):
        run = [layer for _, layer in run]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def render_plan(plan: Plan) -> str:
    """The plan as a table: one row per (role, projections, scheme), consecutive layers merged."""
    rows: dict[tuple, list] = {}
    for e in plan.entries:
        label = "kept " + e.tensor.dtype.lower() if e.scheme is None else e.scheme.label()
        key = (e.tensor.role, e.tensor.proj or "-", label, round(e.bits_per_weight, 3))
        row = rows.setdefault(key, [set(), 0, 0])
        row[0].add(e.tensor.layer)
        row[1] += 1
        row[2] += e.tensor.numel
    # merge rows that differ only by projection (same role, scheme and layers)
    merged: dict[tuple, list] = {}
    for (role, proj, label, bpw), (layers, count, numel) in rows.items():
        key = (role, label, bpw, tuple(sorted(layers, key=lambda x: -1 if x is None else x)))
        row = merged.setdefault(key, [[], 0, 0])
        row[0].append(proj)
        row[1] += count
        row[2] += numel
    table = [("layers", "role", "proj", "tensors", "params", "scheme", "bits/w")]
    ordered = sorted(merged.items(), key=lambda kv: (kv[0][3][0] if kv[0][3][0] is not None else -1, kv[0][0]))
    for (role, label, bpw, layers), (projs, count, numel) in ordered:
        layer_text = "-" if layers == (None,) else _layer_ranges([x for x in layers if x is not None])
        table.append((layer_text, role, ",".join(projs), str(count), _fmt_count(numel), label, f"{bpw:.2f}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = plan.totals()
    inv = plan.inventory
    lines += [
        "",
        f"model: {inv.model_dir or 'config only'} ({inv.family.name}, {inv.num_layers} layers, "
        f"{inv.num_experts} experts top-{inv.dims.get('top_k')}), recipe: {plan.recipe.name}",
        f"params: {_fmt_count(t['params'])}"
        + (f" ({_fmt_count(t['model_params'])} loaded by transformers)" if t["model_params"] != t["params"] else "")
        + f", quantized {_fmt_count(t['quantized_params'])} ({100 * t['quantized_params'] / t['params']:.1f}%)",
        f"average bits/weight: {t['avg_bits']:.2f} over the checkpoint, {t['avg_bits_linear']:.2f} over linear weights, "
        f"{t['avg_bits_layers']:.2f} over decoder-layer linear weights (the autorecipe budget)",
        f"size: {_fmt_bytes(t['bytes'])} vs {_fmt_bytes(t['bf16_bytes'])} in bf16 ({t['bytes'] / t['bf16_bytes']:.2f}x)",
    ]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
