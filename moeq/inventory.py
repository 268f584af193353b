"""The tensor inventory of a model: every tensor with its role, read from safetensors headers or config.json.

`inventory_from_checkpoint` reads config.json and the safetensors headers (never the weights) and gives
every tensor on disk a role through the family table; a tensor that no rule explains, a missing one, or
one whose shape disagrees with config.json is an error, so no expert can ever be skipped silently.
`inventory_from_config` lists the tensors a checkpoint of that config would hold (plans for models not
downloaded yet).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from moeq.errors import CheckpointError
from moeq.families import Family, TensorRule, family_for, model_dims

DTYPE_BITS = {"BF16": 16, "F16": 16, "F32": 32, "F64": 64, "F8_E4M3": 8, "F8_E5M2": 8,
              "I8": 8, "U8": 8, "I16": 16, "I32": 32, "I64": 64, "BOOL": 8}
_TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
LAYER_PREFIX = "model.layers.{i}."


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str                 # safetensors dtype, e.g. "BF16"
    role: str
    proj: str | None
    layer: int | None          # decoder layer, None for model-level tensors
    expert: int | None         # routed-expert index, None otherwise
    shard: str | None = None   # file name holding it; None when listed from config.json

    @property
    def module(self) -> str:
        """The module's name: the tensor name without its .weight/.bias suffix."""
        return self.name.rsplit(".", 1)[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def quantizable(self) -> bool:
        """A 2-D linear weight that a recipe may quantize (never norms, embeddings or biases)."""
        return self.name.endswith(".weight") and len(self.shape) == 2 and self.role not in ("norm", "embed", "mtp")


@dataclass(frozen=True)
class ModelInventory:
    model_dir: Path | None
    family: Family
    config: object             # transformers PretrainedConfig
    dims: dict[str, int]
    tensors: tuple[TensorInfo, ...]

    @property
    def num_layers(self) -> int:
        return self.dims["layers"]

    @property
    def num_experts(self) -> int:
        return self.dims.get("n_experts") or 0

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t.layer for t in self.tensors if t.role == "expert"}))

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        return [t for t in self.tensors if t.layer == layer]

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def load_config(path: str | Path):
    """The transformers config for a model folder or a config.json path, with a clear error on bad input."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found; point moeq at a model folder holding config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if "model_type" not in raw:
        raise CheckpointError(f"{config_path}: has no 'model_type'; is this a Hugging Face config.json?")
    family = family_for(raw["model_type"])
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k not in ("model_type", "quantization_config")}
    try:
        config = AutoConfig.for_model(raw["model_type"], **fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: transformers rejects this config ({err})") from None
    return family, config


def _expected_tensors(family: Family, config, dims: dict[str, int]) -> dict[str, TensorInfo]:
    """Every tensor a checkpoint of this config holds, by name, with expected shape and role."""
    dtype = _TORCH_TO_ST.get(str(getattr(config, "dtype", None) or "bfloat16").replace("torch.", ""), "BF16")
    out: dict[str, TensorInfo] = {}

    def add(rule: TensorRule, prefix: str, layer: int | None, role: str | None = None):
        if rule.when and not dims[rule.when]:
            return
        shape = tuple(dims[d] for d in rule.shape)
        experts = range(dims["n_experts"]) if "{e}" in rule.template else [None]
        for e in experts:
            name = prefix + rule.template.replace("{e}", str(e))
            out[name] = TensorInfo(name, shape, dtype, role or rule.role, None if role else rule.proj, layer, e)

    for rule in family.model_tensors:
        add(rule, "", None)
    num_layers = dims["layers"]
    for i in range(num_layers):
        kind = "moe" if family.moe_layer(config, i) else "dense"
        for rule in family.layer_tensors:
            if rule.layers in ("all", kind):
                add(rule, LAYER_PREFIX.format(i=i), i)
    extra = dims[family.extra_layers] if family.extra_layers else 0
    for i in range(num_layers, num_layers + extra):  # kept as stored: transformers does not load them
        for rule in family.extra_layer_tensors:
            if rule.layers in ("all", "moe"):
                add(rule, LAYER_PREFIX.format(i=i), i, role="mtp")
    return out


def inventory_from_config(path: str | Path) -> ModelInventory:
    """The tensors a checkpoint with this config.json holds (no weights or headers needed)."""
    family, config = load_config(path)
    dims = model_dims(family, config)
    tensors = tuple(_expected_tensors(family, config, dims).values())
    return ModelInventory(None, family, config, dims, tensors)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} from a .safetensors file's JSON header, weights unread."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes); re-download or re-write this shard")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: header claims {header_len} bytes but the file has {size}; "
                                      "the shard is truncated or not a safetensors file")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, entry in header.items():
        end = entry["data_offsets"][1]
        if end > data_len:
            raise CheckpointError(f"{path}: tensor {name} ends at byte {end} of the data but the shard holds "
                                  f"{data_len}; the shard is truncated, re-download it")
    return header


def checkpoint_shards(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from model.safetensors.index.json or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise CheckpointError(f"{index}: names shard {shard}, which is missing from {model_dir}")
        return weight_map
    single = model_dir / "model.safetensors"
    if single.is_file():
        return {name: single.name for name in read_safetensors_header(single)}
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def inventory_from_checkpoint(model_dir: str | Path) -> ModelInventory:
    """Every tensor on disk with its role, checked against config.json (names, shapes; no weights read)."""
    model_dir = Path(model_dir)
    family, config = load_config(model_dir)
    dims = model_dims(family, config)
    expected = _expected_tensors(family, config, dims)
    weight_map = checkpoint_shards(model_dir)
    headers = {shard: read_safetensors_header(model_dir / shard) for shard in sorted(set(weight_map.values()))}

    tensors = []
    for name, shard in weight_map.items():
        entry = headers[shard].get(name)
        if entry is None:
            raise CheckpointError(f"{model_dir / shard}: the index lists tensor {name} here but the shard lacks it")
        want = expected.get(name)
        if want is None:
            raise CheckpointError(_explain_unknown(name, family, dims, model_dir))
        shape = tuple(entry["shape"])
        if shape != want.shape:
            raise CheckpointError(f"{model_dir / shard}: tensor {name} has shape {list(shape)} but config.json "
                                  f"implies {list(want.shape)}; the checkpoint and config.json disagree")
        tensors.append(TensorInfo(name, shape, entry["dtype"], want.role, want.proj, want.layer, want.expert, shard))
    missing = set(expected) - set(weight_map)
    if not any(t.role == "mtp" for t in tensors):  # MTP layers are optional: transformers does not save them
        missing -= {name for name, t in expected.items() if t.role == "mtp"}
    missing = sorted(missing)
    if missing:
        raise CheckpointError(f"{model_dir}: {len(missing)} tensor(s) that config.json implies are missing, "
                              f"e.g. {', '.join(missing[:3])}; the download is incomplete or config.json is wrong")
    order = {name: i for i, name in enumerate(expected)}  # model order: layer by layer, experts in index order
    tensors.sort(key=lambda t: order[t.name])
    return ModelInventory(model_dir, family, config, dims, tuple(tensors))


def _explain_unknown(name: str, family: Family, dims: dict[str, int], model_dir: Path) -> str:
    """Why `name` fits no tensor of the family: an index beyond config.json, or no rule at all."""
    if name.endswith(("weight_scale_inv", "weight_scale", "qweight", "qzeros")):
        return (f"{model_dir}: tensor {name} is already quantized; moeq quantizes bf16/fp16/fp32 checkpoints. "
                "Dequantize it first (e.g. DeepSeek's fp8_cast_bf16.py for fp8 weights)")
    for rule in family.layer_tensors + family.extra_layer_tensors:
        pattern = re.escape(LAYER_PREFIX + rule.template).replace(r"\{i\}", r"(\d+)").replace(r"\{e\}", r"(\d+)")
        match = re.fullmatch(pattern, name)
        if match:
            layer = int(match.group(1))
            expert = int(match.group(2)) if "{e}" in rule.template else None
            if expert is not None and expert >= dims["n_experts"]:
                return f"{model_dir}: tensor {name} is expert {expert} but config.json has {dims['n_experts']} experts"
            return (f"{model_dir}: tensor {name} is in layer {layer}, which config.json does not give this tensor "
                    f"({dims['layers']} layers; check the dense/MoE layer settings)")
    return (f"{model_dir}: no rule of family {family.name!r} explains tensor {name}. If the checkpoint is right, "
            "add a TensorRule for it to moeq/families.py")
