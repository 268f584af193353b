"""`moeq inspect PATH`: what a checkpoint holds, what a loader will see, and where it disagrees with config.json.

It reads config.json, the safetensors headers and moeq.json, never the weights (compressed-tensors'
two-number `weight_shape` tensors excepted; `--verify` also reads and unpacks every tensor). Every
original tensor that config.json implies gets the scheme its quantization_config resolves for its
module, exactly as `moeq.loader.StoredCheckpoint` and the engines resolve it, and is checked from the
headers alone: each packed part present with the dtype and shape that scheme implies (a header saying
8 bits over qweight rows holding 4 is named as such), kept tensors of config.json's shape. Unlike the
loader, which stops at the first disagreement, inspection collects all of them, plus tensors that
nothing explains and shards the index cannot deliver.

The table is `moeq plan`'s (render_plan over the stored schemes), followed by the bytes on disk per role
against bf16, the header as a loader reads it (format, `dynamic` rules or config groups, and how many
modules each rule claims), and moeq.json's summary when moeq wrote the checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeq.errors import CheckpointError
from moeq.families import ROLES
from moeq.formats import Scheme, values_per_word_run
from moeq.inventory import ModelInventory, TensorInfo, inventory_from_config, read_safetensors_header
from moeq.loader import PACKED, StoredCheckpoint
from moeq.plan import Plan, TensorPlan, _fmt_bytes, _fmt_count, _vllm_problems, render_plan
from moeq.recipe import Recipe
from moeq.recipe import Scheme as RecipeScheme

PROBLEM_KINDS = ("shard", "header", "missing", "shape", "unexplained", "data")
SHOWN_PER_KIND = 8  # problems printed per kind; --json holds them all
_FORMAT_OF_SIDECAR = {"gptq": "gptq", "compressed-tensors": "compressed-tensors", "dequantized": None}


@dataclass(frozen=True)
class Problem:
    kind: str      # one of PROBLEM_KINDS
    where: str     # the module, tensor or file at fault
    message: str


@dataclass(frozen=True)
class StoredTensor:
    """One original tensor: how the header says it is stored, and what holds it on disk."""

    tensor: TensorInfo            # shape as config.json implies; dtype as stored when kept
    scheme: Scheme | None         # the header's (bits, group_size, sym) for its module; None: kept
    parts: tuple[str, ...]        # tensors on disk that hold it
    nbytes: int                   # their bytes on disk


@dataclass(frozen=True)
class Inspection:
    path: Path
    inventory: ModelInventory     # what config.json implies, as stored
    quantization_config: dict | None
    stored: tuple[StoredTensor, ...]
    problems: tuple[Problem, ...]
    sidecar: dict | None          # moeq.json
    file_bytes: int               # shard files on disk, headers included

    def plan(self) -> Plan:
        """The stored schemes as a moeq.plan.Plan, so `moeq plan`'s table and totals apply."""
        entries = tuple(TensorPlan(s.tensor, None if s.scheme is None else _StoredScheme(*s.scheme), None)
                        for s in self.stored)
        recipe = Recipe("stored in checkpoint", None, (), {})
        return Plan(self.inventory, recipe, entries, tuple(f"vLLM: {p}" for p in _vllm_problems(list(entries))))

    def role_sizes(self) -> list[dict]:
        """Per role: tensors, parameters, bytes on disk and in bf16, stored bits per weight."""
        rows: dict[str, dict] = {}
        for s in self.stored:
            row = rows.setdefault(s.tensor.role, {"role": s.tensor.role, "tensors": 0, "params": 0, "bytes": 0})
            row["tensors"] += 1
            row["params"] += s.tensor.numel
            row["bytes"] += s.nbytes
        for row in rows.values():
            row["bf16_bytes"] = 2 * row["params"]
            row["bits_per_weight"] = 8 * row["bytes"] / max(row["params"], 1)
        return sorted(rows.values(), key=lambda row: ROLES.index(row["role"]))

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "family": self.inventory.family.name,
            "quantization_config": self.quantization_config,
            "problems": [p.__dict__ for p in self.problems],
            "sizes": self.role_sizes(),
            "file_bytes": self.file_bytes,
            "tensors": [{"name": s.tensor.name, "role": s.tensor.role, "layer": s.tensor.layer,
                         "shape": list(s.tensor.shape), "scheme": None if s.scheme is None else s.scheme._asdict(),
                         "parts": list(s.parts), "bytes": s.nbytes} for s in self.stored],
        }


@dataclass(frozen=True)
class _StoredScheme(RecipeScheme):
    """A recipe Scheme labelled by storage alone: the header does not say how the weights were solved."""

    def label(self) -> str:
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {group} {'sym' if self.sym else 'asym'}"


def inspect_checkpoint(path: str | Path, verify: bool = False) -> Inspection:
    """Everything `moeq inspect` reports about the checkpoint at `path`. verify: also unpack every tensor.

    A config.json that cannot be read, a quantization_config no reader understands or a folder without
    safetensors is a CheckpointError; every other disagreement becomes a Problem.
    """
    path = Path(path)
    expected = inventory_from_config(path)
    header = json.loads((path / "config.json").read_text()).get("quantization_config")
    method = header.get("quant_method") if header else None
    if header and method not in PACKED:
        raise CheckpointError(f"{path / 'config.json'}: quant_method {method!r} is not one moeq reads "
                              f"({', '.join(PACKED)})")
    resolve = PACKED[method][0].read_quantization_config(header) if header else (lambda module: None)
    problems: list[Problem] = []
    files = _Files.scan(path, problems)
    sidecar = _read_sidecar(path, method, problems)

    claimed: set[str] = set()
    stored, tensors = [], []
    present_layers = {int(m.group(1)) for n in [*files.entries, *files.lost, *files.unindexed]
                      if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    for t in expected.tensors:
        if t.role == "mtp" and t.layer not in present_layers:
            continue  # MTP layers are optional: transformers does not save them
        scheme = resolve(t.module) if t.quantizable else None
        if scheme is None:
            parts = _check_kept(t, method, files, problems)
        else:
            parts = _check_packed(t, scheme, method, files, problems)
        claimed.update(parts)
        entries = [files.entries[p] for p in parts]
        dtype = entries[0]["dtype"] if scheme is None and entries else t.dtype
        info = replace(t, dtype=dtype, shard=entries[0]["shard"] if entries else None)
        stored.append(StoredTensor(info, scheme, parts, sum(e["data_offsets"][1] - e["data_offsets"][0]
                                                            for e in entries)))
        tensors.append(info)
    strays: dict[str, list[str]] = {}  # module -> parts on disk that nothing explains
    for name in sorted(set(files.entries) - claimed):
        strays.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for module, names in strays.items():
        what = ", ".join(f"{n.rsplit('.', 1)[1]} {files.entries[n]['dtype']} {files.entries[n]['shape']}"
                         for n in names)
        problems.append(Problem("unexplained", module, f"{module} ({what}, in {files.entries[names[0]]['shard']}): "
                                                       f"{_why_unexplained(module, expected)}"))
    for name in sorted(set(files.unindexed) - files.mentioned):
        problems.append(Problem("shard", name, f"{name}: {files.unindexed[name]} holds it, but the index does not "
                                               "list it, so loaders never see it"))
    inventory = replace(expected, model_dir=path, tensors=tuple(tensors))
    if verify and not problems:
        problems += _verify(path)
    return Inspection(path, inventory, header, tuple(stored), tuple(problems), sidecar, file_bytes=files.nbytes)


@dataclass
class _Files:
    """The tensors of a checkpoint's shards as its index presents them to loaders."""

    path: Path
    entries: dict[str, dict]      # name -> safetensors header entry, plus "shard"
    lost: set[str]                # listed in the index, in a shard that is missing or unreadable
    unindexed: dict[str, str]     # name -> shard holding it, for tensors the index does not list
    nbytes: int                   # bytes of the readable shard files
    mentioned: set[str] = field(default_factory=set)  # unindexed names already named in a problem

    @classmethod
    def scan(cls, path: Path, problems: list[Problem]) -> "_Files":
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        elif (path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        files = cls(path, {}, set(), {}, 0)
        for shard in sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]:
            listed = [n for n, s in weight_map.items() if s == shard] if weight_map is not None else None
            if not (path / shard).is_file():
                problems.append(Problem("shard", shard, f"{shard}: the index names it for {len(listed)} tensor(s) "
                                                        f"but it is not in {path}"))
                files.lost.update(listed)
                continue
            try:
                entries = read_safetensors_header(path / shard)
            except CheckpointError as err:
                problems.append(Problem("shard", shard, str(err)))
                files.lost.update(listed or ())
                continue
            files.nbytes += (path / shard).stat().st_size
            listed = list(entries) if listed is None else listed
            for name in listed:
                if name in entries:
                    files.entries[name] = {**entries[name], "shard": shard}
                else:
                    problems.append(Problem("shard", name, f"{name}: the index puts it in {shard}, which lacks it"))
            files.unindexed.update({name: shard for name in set(entries) - set(listed)})
        return files

    def absent(self, names: list[str]) -> str:
        """Why `names` are not available: ' (a shard holds X, but the index does not list it)' or ''."""
        found = [n for n in names if n in self.unindexed]
        self.mentioned.update(found)
        return "".join(f" ({self.unindexed[n]} holds {n.rsplit('.', 1)[1]}, but the index does not list it)"
                       for n in found)


def _check_kept(t: TensorInfo, method: str | None, files: _Files, problems: list) -> tuple[str, ...]:
    """A tensor the header leaves unquantized: itself on disk, of config.json's shape."""
    if t.name in files.entries:
        e = files.entries[t.name]
        if tuple(e["shape"]) != t.shape:
            problems.append(Problem("shape", t.name, f"{t.name} is {e['dtype']} {e['shape']}, config.json implies "
                                                     f"{list(t.shape)}"))
        return (t.name,)
    if t.name in files.lost:
        return ()
    packed = [n for _, suffixes in PACKED.values() for n in (f"{t.module}.{x}" for x in suffixes)
              if n in files.entries]
    if packed:
        problems.append(Problem("header", t.module, f"{t.module}: the quantization_config keeps it unquantized "
                                f"({method or 'no quantization_config'}), but the checkpoint holds it packed "
                                f"({', '.join(n.rsplit('.', 1)[1] for n in packed)})"))
        return tuple(packed)
    problems.append(Problem("missing", t.name, f"{t.name}: config.json implies it ({list(t.shape)}), the checkpoint "
                                               f"lacks it{files.absent([t.name])}"))
    return ()


def _check_packed(t: TensorInfo, scheme: Scheme, method: str, files: _Files, problems: list) -> tuple[str, ...]:
    """A quantized module: every part present, of the dtype and shape the header's scheme implies."""
    n, k = t.shape
    label = _label(scheme)
    on_disk = files.entries
    if scheme.group_size != -1 and k % scheme.group_size:
        problems.append(Problem("header", t.module, f"{t.module}: the header's {label} has groups of "
                                                    f"{scheme.group_size}, which do not divide K={k}"))
        return tuple(f"{t.module}.{s}" for s in PACKED[method][1] if f"{t.module}.{s}" in on_disk)
    parts = _expected_parts(method, scheme, n, k)
    names = {s: f"{t.module}.{s}" for s in parts}
    present = {s: name for s, name in names.items() if name in on_disk}
    if not present and t.name in on_disk:
        e = on_disk[t.name]
        problems.append(Problem("header", t.module, f"{t.module}: the header says {label}, but it is stored "
                                                    f"unquantized ({t.name}, {e['dtype']} {e['shape']})"))
        return (t.name,)
    if any(name in files.lost for name in names.values()):
        return tuple(present.values())
    missing = [s for s, (_, _, need) in parts.items() if need == "required" and s not in present]
    if missing:
        problems.append(Problem("missing", t.module, f"{t.module}: the header says {label}; {', '.join(missing)} "
                                f"missing{files.absent([names[s] for s in missing])}"))
    wrong = []
    for suffix, name in present.items():
        dtypes, shape, need = parts[suffix]
        e = on_disk[name]
        if need == "absent":
            wrong.append(f"{suffix} is stored, but a symmetric scheme stores none")
        elif e["dtype"] not in dtypes or tuple(e["shape"]) != shape:
            hint = _hint(method, suffix, tuple(e["shape"]), n, k)
            wrong.append(f"{suffix} is {e['dtype']} {e['shape']}, needs {dtypes[0]} {list(shape)}"
                         + (f" ({hint})" if hint else ""))
        elif suffix == "weight_shape":
            stated = _read_small(files.path / e["shard"], name)
            if tuple(stated) != (n, k):
                wrong.append(f"weight_shape says {stated}")
    if wrong:
        problems.append(Problem("shape", t.module, f"{t.module}: the header says {label}, which for a [{n}, {k}] "
                                                   f"weight disagrees with the stored parts: {'; '.join(wrong)}"))
    if method == "gptq":
        run = values_per_word_run(scheme.bits)
        if n % run or k % run:
            problems.append(Problem("shape", t.module, f"{t.module}: GPTQ packs {scheme.bits}-bit values {run} to "
                                                       f"whole int32 words; [{n}, {k}] is not a multiple of {run}"))
    return tuple(present.values())


def _expected_parts(method: str, scheme: Scheme, n: int, k: int) -> dict[str, tuple[tuple[str, ...], tuple, str]]:
    """suffix -> (allowed dtypes, shape, "required" | "optional" | "absent") of a packed [n, k] weight,
    as moeq.formats.gptq and .compressed_tensors lay them out (see their docstrings)."""
    bits, group_size, sym = scheme
    g = 1 if group_size == -1 else k // group_size
    if method == "gptq":
        return {"qweight": (("I32",), (k * bits // 32, n), "required"),
                "qzeros": (("I32",), (g, n * bits // 32), "required"),
                "scales": (("F16",), (g, n), "required"),
                "g_idx": (("I32",), (k,), "optional")}
    return {"weight_packed": (("I32",), (n, -(-k * bits // 32)), "required"),
            "weight_scale": (("F16",), (n, g), "required"),
            "weight_shape": (("I64", "I32"), (2,), "required"),
            "weight_zero_point": (("I32",), (-(-n * bits // 32), g), "absent" if sym else "required")}


def _hint(method: str, suffix: str, shape: tuple, n: int, k: int) -> str:
    """What a mis-shaped part's shape suggests instead (bits per value, group size)."""
    if len(shape) != 2:
        return ""
    rows, cols = shape
    if method == "gptq" and suffix == "qweight" and cols == n:
        return f"its rows hold {rows * 32 / k:g}-bit values"
    if method == "gptq" and suffix == "scales" and cols == n and rows:
        return f"{rows} group(s): groups of {k / rows:g}"
    if method != "gptq" and suffix == "weight_packed" and rows == n:
        return f"its rows hold {cols * 32 / k:g}-bit values"
    if method != "gptq" and suffix == "weight_scale" and rows == n and cols:
        return f"{cols} group(s): groups of {k / cols:g}"
    return ""


def _read_small(shard: Path, name: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return [int(x) for x in f.get_tensor(name).tolist()]


def _why_unexplained(name: str, expected: ModelInventory) -> str:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= expected.num_layers + (expected.dims.get("mtp_layers") or 0):
        return f"layer {m.group(1)}, but config.json has {expected.num_layers} layers"
    m = re.search(r"\.experts\.(\d+)\.", name)
    if m and int(m.group(1)) >= expected.num_experts:
        return f"expert {m.group(1)}, but config.json has {expected.num_experts} experts"
    return f"no tensor of config.json's {expected.family.name} model or its quantization_config has this name"


def _read_sidecar(path: Path, method: str | None, problems: list) -> dict | None:
    sidecar_path = path / "moeq.json"
    if not sidecar_path.is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as err:
        problems.append(Problem("header", "moeq.json", f"moeq.json is not valid JSON ({err})"))
        return None
    fmt = sidecar.get("format")
    if fmt in _FORMAT_OF_SIDECAR and _FORMAT_OF_SIDECAR[fmt] != method:
        problems.append(Problem("header", "moeq.json", f"moeq.json says moeq wrote format {fmt!r}, but config.json's "
                                                       f"quant_method is {method!r}"))
    return sidecar


def _verify(path: Path) -> list[Problem]:
    """Read every tensor through moeq's loader: unpacks quantized ones (value ranges, zero points, g_idx)."""
    try:
        checkpoint = StoredCheckpoint(path)
    except CheckpointError as err:
        return [Problem("data", str(path), str(err))]
    problems = []
    for t in checkpoint.inventory.tensors:
        try:
            checkpoint.packed(t) if checkpoint.schemes[t.name] is not None else checkpoint.read(t)
        except CheckpointError as err:
            problems.append(Problem("data", t.module, str(err)))
    return problems


# ---- rendering ---------------------------------------------------------------------------------------------

def _label(scheme: Scheme | None) -> str:
    return "kept" if scheme is None else _StoredScheme(*scheme).label()


def render_inspection(inspection: Inspection) -> str:
    """The report `moeq inspect` prints."""
    lines = [render_plan(inspection.plan()), "", _render_sizes(inspection), "", *_render_loader(inspection), ""]
    lines += _render_sidecar(inspection.sidecar)
    lines.append("")
    if not inspection.problems:
        lines.append("no problems: every tensor is where config.json and its quantization_config say, "
                     "of the shape they imply")
        return "\n".join(lines)
    lines.append(f"{len(inspection.problems)} problem(s):")
    for kind in PROBLEM_KINDS:
        found = [p for p in inspection.problems if p.kind == kind]
        lines += [f"  {kind}: {p.message}" for p in found[:SHOWN_PER_KIND]]
        if len(found) > SHOWN_PER_KIND:
            lines.append(f"  {kind}: ... and {len(found) - SHOWN_PER_KIND} more (--json lists all)")
    return "\n".join(lines)


def _render_sizes(inspection: Inspection) -> str:
    rows = inspection.role_sizes()
    total = {k: sum(r[k] for r in rows) for k in ("tensors", "params", "bytes", "bf16_bytes")}
    table = [("role", "tensors", "params", "on disk", "bf16", "ratio", "bits/w")]
    for r in [*rows, {"role": "total", **total, "bits_per_weight": 8 * total["bytes"] / max(total["params"], 1)}]:
        table.append((r["role"], str(r["tensors"]), _fmt_count(r["params"]), _fmt_bytes(r["bytes"]),
                      _fmt_bytes(r["bf16_bytes"]), f"{r['bytes'] / max(r['bf16_bytes'], 1):.2f}x",
                      f"{r['bits_per_weight']:.2f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(0, "bytes on disk (safetensors headers):")
    lines.append(f"files: {_fmt_bytes(inspection.file_bytes)} in shards (headers included)")
    return "\n".join(lines)


def _render_loader(inspection: Inspection) -> list[str]:
    cfg = inspection.quantization_config
    modules = sorted({s.tensor.module for s in inspection.stored if s.tensor.quantizable})
    if not cfg:
        return ["loader view: no quantization_config; every tensor loads as stored (bf16/fp16/fp32)"]
    method = cfg.get("quant_method")
    if method == "gptq":
        fmt = cfg.get("checkpoint_format") or "gptq"
        lm_head = bool(cfg.get("lm_head", False))
        lines = [f"loader view: quant_method gptq, checkpoint_format {fmt} "
                 f"({'zero points stored exactly' if fmt == 'gptq_v2' else 'v1: zero points stored minus 1'}), "
                 f"desc_act {json.dumps(cfg.get('desc_act'))}, lm_head {json.dumps(lm_head)}"]
        if not lm_head:  # loaders keep lm_head whatever the rules say
            modules = [m for m in modules if m.rsplit(".", 1)[-1] != "lm_head"]
        rules = [(key, re.compile(key[2:] if key[:2] in ("-:", "+:") else key), value)
                 for key, value in (cfg.get("dynamic") or {}).items()]
        counts = [0] * len(rules)
        for module in modules:
            hit = next((i for i, (_, pattern, _) in enumerate(rules) if pattern.match(module)), None)
            if hit is not None:
                counts[hit] += 1
        base = Scheme(cfg.get("bits"), cfg.get("group_size"), cfg.get("sym", True))
        lines.append(f"  base: {_label(base)} (modules no dynamic rule matches: {len(modules) - sum(counts)})")
        lines.append("  dynamic (first re.match wins; '-:' keeps a module unquantized):")
        for (key, _, value), count in zip(rules, counts):
            scheme = None if key.startswith("-:") else Scheme(value.get("bits", base.bits),
                                                              value.get("group_size", base.group_size),
                                                              value.get("sym", base.sym))
            lines.append(f"    {key}  -> {_label(scheme)}, {count} module(s)")
        return lines
    lines = [f"loader view: quant_method {method}, format {cfg.get('format')}, "
             f"status {cfg.get('quantization_status', 'compressed')} (ignore first, then the first group whose "
             "target matches)"]
    ignore = list(cfg.get("ignore") or [])
    groups = list((cfg.get("config_groups") or {}).items())
    rules = [("ignore", ignore, None)] + [(name, g.get("targets") or [], g.get("weights") or {}) for name, g in groups]
    counts = [0] * len(rules)
    for module in modules:
        hit = next((i for i, (_, targets, _) in enumerate(rules) if any(_ct_matches(t, module) for t in targets)),
                   None)
        if hit is not None:
            counts[hit] += 1
    for (name, targets, w), count in zip(rules, counts):
        scheme = None if w is None else Scheme(w.get("num_bits", 8), -1 if w.get("strategy") == "channel"
                                               else w.get("group_size"), w.get("symmetric", True))
        lines.append(f"  {name}: {_label(scheme)}, {count} module(s): {', '.join(targets) or '-'}")
    lines.append(f"  matched by nothing (kept): {len(modules) - sum(counts)} module(s)")
    return lines


def _ct_matches(target: str, name: str) -> bool:
    """compressed-tensors' target rule: "re:" regexes by re.match, class names match every Linear, else exact."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return ("." not in target and target[:1].isupper()) or target == name


def _render_sidecar(sidecar: dict | None) -> list[str]:
    if sidecar is None:
        return ["moeq.json: none (not written by moeq, or removed)"]
    recipe = sidecar.get("recipe") or {}
    report = sidecar.get("report") or {}
    lines = [f"moeq.json: moeq {sidecar.get('moeq_version', '?')}, format {sidecar.get('format', '?')}, "
             f"recipe: {recipe.get('description') or '(no description)'}"]
    ppl = report.get("perplexity") or {}
    if "before" in ppl and "after" in ppl:
        before, after = ppl["before"], ppl["after"]
        lines.append(f"  perplexity: {before:.3f} -> {after:.3f} ({100 * (after / before - 1):+.2f}%)")
    else:
        lines.append("  perplexity: not measured (quantized without --eval)")
    if "calibration_tokens" in report:
        lines.append(f"  calibration: {report['calibration_tokens']} tokens")
    flags = report.get("flags") or []
    lines.append(f"  flags: {len(flags)}" if flags else "  flags: none")
    lines += [f"    {f}" for f in flags]
    return lines


# ---- command line -------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    """Register `moeq inspect` on an argparse subparsers object."""
    p = subparsers.add_parser("inspect", help="what a checkpoint holds per layer and role, what loaders will see, "
                                              "and every tensor that disagrees with config.json")
    p.add_argument("path", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--verify", action="store_true", help="when the headers show no problem, also read and unpack "
                                                         "every tensor through moeq's loader (reads all weights)")
    p.add_argument("--json", help="also write the inspection, every problem included, as JSON here")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> None:
    """Print the inspection; exit status 1 when it found problems."""
    inspection = inspect_checkpoint(args.path, verify=args.verify)
    print(render_inspection(inspection))
    if args.json:
        Path(args.json).write_text(json.dumps(inspection.to_json(), indent=1))
        print(f"inspection written to {args.json}")
    if inspection.problems:
        raise SystemExit(1)
