"""Recipes: an ordered list of rules, each a selector and a scheme, read from YAML.

    extends: mixtral            # optional: a built-in recipe name or a path relative to this file
    family: mixtral             # optional: refuse to plan another family with it
    defaults: {group_size: 128, sym: true, method: gptq}
    rules:
      - {role: attn, bits: 8, group_size: -1}
      - {role: expert, bits: 4}
      - {role: [attn, expert], layers: "-2:", bits: 16}

Precedence: the LAST rule that matches a tensor decides it, wholesale: its scheme is the recipe's
`defaults` overlaid with that rule's own scheme keys. A tensor no rule matches is kept as stored.
`extends` puts the parent's rules first (so the child's later rules win) and merges `defaults`
(child over parent). `--set a.b=value` overrides any key of the merged recipe by dotted path
(e.g. `defaults.group_size=64`, `rules.1.bits=8`).
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from moeq.errors import RecipeError
from moeq.families import ROLES

BUILTIN_RECIPES = Path(__file__).resolve().parent.parent / "recipes"

SUPPORTED_BITS = (2, 3, 4, 8, 16)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
METHODS = ("gptq", "rtn")
STARVED_POLICIES = ("shrink", "rtn")
SELECTOR_KEYS = ("role", "proj", "layers", "experts", "name")
TOP_KEYS = ("extends", "family", "description", "defaults", "rules")
NEVER_QUANTIZED = ("norm", "embed", "mtp")


@dataclass(frozen=True)
class Scheme:
    """What happens to one weight. bits == 16 means kept as stored."""

    bits: int = 16
    group_size: int = 128      # -1: one scale per output channel
    sym: bool = True
    act_order: bool = True     # GPTQ column order by Hessian diagonal, with static groups
    method: str = "gptq"       # "gptq" | "rtn"
    damp: float = 0.01         # relative diagonal damping of the Hessian
    clip: bool = False         # MSE search of each group's clipping range
    min_tokens: int = 256      # experts with fewer routed tokens get the `starved` policy
    starved: str = "shrink"    # "shrink": blend with the layer-average Hessian | "rtn": round to nearest
    gate_weighted: bool = False  # weight each token in an expert's Hessian by its gate score (AGQ)

    @property
    def keep(self) -> bool:
        return self.bits == 16

    @property
    def storage(self) -> tuple:
        """What a checkpoint loader sees: two schemes with the same storage pack identically."""
        return ("bf16",) if self.keep else (self.bits, self.group_size, self.sym)

    @property
    def format(self):
        """The number format (moeq.quant_format.QuantFormat) of a quantized scheme."""
        from moeq.quant_format import QuantFormat

        return QuantFormat(self.bits, self.group_size, self.sym, clip_search=self.clip)

    def label(self) -> str:
        if self.keep:
            return "kept"
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        extras = [self.method] + (["act"] if self.act_order and self.method == "gptq" else [])
        return f"int{self.bits} {group} {'sym' if self.sym else 'asym'} {'+'.join(extras)}"

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight including fp16 scales (and packed zero points when asymmetric)."""
        group = in_features if self.group_size == -1 else self.group_size
        return self.bits + (16 + (0 if self.sym else self.bits)) / group


SCHEME_KEYS = tuple(f.name for f in fields(Scheme))


@dataclass(frozen=True)
class Selector:
    roles: tuple[str, ...] | None = None
    projs: tuple[str, ...] | None = None
    layers: object = None      # index spec: int, "a-b" (inclusive), "a:b" / "-4:" (python slice), or a list
    experts: object = None
    name: str | None = None    # regex searched in the tensor name

    def matches(self, tensor, num_layers: int, num_experts: int) -> bool:
        return (
            (self.roles is None or tensor.role in self.roles)
            and (self.projs is None or tensor.proj in self.projs)
            and (self.layers is None or (tensor.layer is not None
                                         and tensor.layer in index_set(self.layers, num_layers)))
            and (self.experts is None or (tensor.expert is not None
                                          and tensor.expert in index_set(self.experts, num_experts)))
            and (self.name is None or re.search(self.name, tensor.name) is not None)
        )


@dataclass(frozen=True)
class Rule:
    selector: Selector
    scheme: Scheme
    where: str                 # "recipe.yaml rule 3", for messages


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str | None
    rules: tuple[Rule, ...]
    source: dict               # the merged YAML tree, written into the checkpoint's sidecar

    def scheme_for(self, tensor, num_layers: int, num_experts: int) -> tuple[Scheme | None, int | None]:
        """(scheme, rule index) of the last matching rule, or (None, None) when no rule matches."""
        for i in range(len(self.rules) - 1, -1, -1):
            if self.rules[i].selector.matches(tensor, num_layers, num_experts):
                return self.rules[i].scheme, i
        return None, None


def index_set(spec, count: int) -> set[int]:
    """Indices in range(count) named by `spec`: 3, "-1", "0-2", "-4:", ":8", or a list of those."""
    if isinstance(spec, list):
        return set().union(*(index_set(s, count) for s in spec)) if spec else set()
    if isinstance(spec, bool):
        raise RecipeError(f"index spec {spec!r}: use an integer, 'a-b', 'a:b' or a list")
    if isinstance(spec, int):
        i = spec + count if spec < 0 else spec
        return {i} if 0 <= i < count else set()
    text = str(spec).strip()
    try:
        if ":" in text:
            start, stop = (int(p) if p.strip() else None for p in text.split(":", 1))
            return set(range(count)[slice(start, stop)])
        if re.fullmatch(r"-?\d+", text):
            return index_set(int(text), count)
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            return set(range(low, min(high, count - 1) + 1))
    except ValueError:
        pass
    raise RecipeError(f"index spec {spec!r}: use an integer, 'a-b' (inclusive), 'a:b' or '-4:' (last four), "
                      "or a list of those")


def _nearest(key: str, allowed) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_recipe_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file: an existing path (relative to `relative_to` first), else a built-in name."""
    candidates = []
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute():
        candidates.append(relative_to / path)
    candidates += [path, BUILTIN_RECIPES / path, BUILTIN_RECIPES / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    builtin = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
    raise RecipeError(f"recipe {str(name_or_path)!r} not found: give a YAML path or a built-in name "
                      f"({', '.join(builtin)}){_nearest(str(name_or_path), builtin)}")


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The recipe's YAML tree with `extends` merged in (parents first)."""
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"{path}: `extends` loops back to itself ({' -> '.join(p.name for p in chain)})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    for key in tree:
        if key not in TOP_KEYS:
            raise RecipeError(f"{path}: unknown key {key!r}{_nearest(key, TOP_KEYS)}; allowed: {', '.join(TOP_KEYS)}")
    rules = tree.get("rules") or []
    if not isinstance(rules, list):
        raise RecipeError(f"{path}: `rules` must be a list of rules")
    tree["rules"] = [dict(rule, _where=f"{path.name} rule {i}") if isinstance(rule, dict) else rule
                     for i, rule in enumerate(rules)]
    if "extends" not in tree:
        return tree
    parent = _read_tree(resolve_recipe_path(tree.pop("extends"), path.parent), chain + (path,))
    return {
        "family": tree.get("family", parent.get("family")),
        "description": tree.get("description", parent.get("description")),
        "defaults": {**(parent.get("defaults") or {}), **(tree.get("defaults") or {})},
        "rules": parent["rules"] + tree["rules"],
    }


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the recipe tree, in place."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: write it as key.path=value, e.g. defaults.group_size=64")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                raise RecipeError(f"--set {path}: {key!r} is not a rule index (the recipe has {len(node)} rules)")
            key = int(key)
        elif isinstance(node, dict):
            if key not in node and not last:
                node[key] = {}
        else:
            raise RecipeError(f"--set {path}: {'.'.join(keys[:depth])} is a value, not a mapping or list")
        if last:
            node[key] = yaml.safe_load(raw)
        else:
            node = node[key]


def _as_tuple(value, allowed, what: str, where: str) -> tuple[str, ...]:
    items = tuple(value) if isinstance(value, list) else (value,)
    for item in items:
        if allowed is not None and item not in allowed:
            raise RecipeError(f"{where}: unknown {what} {item!r}{_nearest(item, allowed)}; "
                              f"allowed: {', '.join(map(str, allowed))}")
    return tuple(str(i) for i in items)


def _scheme(values: dict, where: str) -> Scheme:
    scheme = replace(Scheme(), **values)
    checks = [
        (scheme.bits in SUPPORTED_BITS, f"bits {scheme.bits!r} is not supported; use one of {SUPPORTED_BITS} (16 = keep)"),
        (scheme.group_size in SUPPORTED_GROUP_SIZES,
         f"group_size {scheme.group_size!r} is not supported; use one of {SUPPORTED_GROUP_SIZES} (-1 = per channel)"),
        (scheme.method in METHODS, f"method {scheme.method!r}: use one of {', '.join(METHODS)}"),
        (scheme.starved in STARVED_POLICIES, f"starved {scheme.starved!r}: use one of {', '.join(STARVED_POLICIES)}"),
        (isinstance(scheme.damp, (int, float)) and 0 < scheme.damp <= 1, f"damp {scheme.damp!r}: use a number in (0, 1]"),
        (isinstance(scheme.min_tokens, int) and scheme.min_tokens >= 0, f"min_tokens {scheme.min_tokens!r}: use an integer >= 0"),
    ] + [(isinstance(getattr(scheme, k), bool), f"{k} must be true or false")
         for k in ("sym", "act_order", "clip", "gate_weighted")]
    for ok, message in checks:
        if not ok:
            raise RecipeError(f"{where}: {message}")
    return scheme


def build_recipe(tree: dict, name: str) -> Recipe:
    """Validate a merged recipe tree into a Recipe (errors name the rule and key at fault)."""
    defaults = tree.get("defaults") or {}
    for key in defaults:
        if key not in SCHEME_KEYS:
            raise RecipeError(f"{name} defaults: unknown scheme key {key!r}{_nearest(key, SCHEME_KEYS)}")
    rules = []
    for i, raw in enumerate(tree.get("rules") or []):
        if not isinstance(raw, dict):
            raise RecipeError(f"{name} rule {i}: a rule is a mapping of selector and scheme keys, got {raw!r}")
        where = raw.get("_where", f"{name} rule {i}")
        body = {k: v for k, v in raw.items() if k != "_where"}
        for key in body:
            if key not in SELECTOR_KEYS + SCHEME_KEYS:
                raise RecipeError(f"{where}: unknown key {key!r}{_nearest(key, SELECTOR_KEYS + SCHEME_KEYS)}")
        selector = Selector(
            roles=_as_tuple(body["role"], ROLES, "role", where) if "role" in body else None,
            projs=_as_tuple(body["proj"], None, "proj", where) if "proj" in body else None,
            layers=body.get("layers"),
            experts=body.get("experts"),
            name=body.get("name"),
        )
        for spec in (selector.layers, selector.experts):
            if spec is not None:
                try:
                    index_set(spec, 1)  # validates the syntax
                except RecipeError as err:
                    raise RecipeError(f"{where}: {err}") from None
        if selector.name is not None:
            try:
                re.compile(selector.name)
            except re.error as err:
                raise RecipeError(f"{where}: name {selector.name!r} is not a valid regex ({err})") from None
        scheme = _scheme({**defaults, **{k: v for k, v in body.items() if k in SCHEME_KEYS}}, where)
        never = set(selector.roles or ()) & set(NEVER_QUANTIZED)
        if never and not scheme.keep:
            raise RecipeError(f"{where}: role {sorted(never)[0]!r} cannot be quantized (moeq quantizes linear "
                              "weights only); drop it from this rule or set bits: 16")
        rules.append(Rule(selector, scheme, where))
    return Recipe(name, tree.get("family"), tuple(rules), {k: v for k, v in tree.items()})


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or built-in name), merge `extends`, apply `--set` overrides, validate."""
    path = resolve_recipe_path(name_or_path)
    tree = _read_tree(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    recipe = build_recipe(tree, path.name)
    clean = copy.deepcopy(tree)
    for rule in clean.get("rules") or []:
        if isinstance(rule, dict):
            rule.pop("_where", None)
    return replace(recipe, source=clean)
