"""Reading a checkpoint's tensors from its safetensors shards, and where each lives in transformers' modules.

transformers 5 keeps experts per expert on disk (`experts.3.w1.weight`) but fuses them in memory into
`mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first, then up) and `mlp.experts.down_proj` [E, H, I].
A `WeightSlot` says where one on-disk tensor lives in a decoder layer module, so the pipeline can read
and write it without per-family code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeq.errors import CheckpointError
from moeq.inventory import LAYER_PREFIX, ModelInventory, TensorInfo


@dataclass(frozen=True)
class WeightSlot:
    """One on-disk tensor inside a decoder layer module: `param[expert][rows]`, or `param` itself."""

    param: str                 # parameter path relative to the decoder layer, e.g. "mlp.experts.gate_up_proj"
    expert: int | None = None
    rows: slice | None = None  # gate: [0, I), up: [I, 2I) of gate_up_proj

    def module_path(self) -> str:
        return self.param.rsplit(".", 1)[0]

    def get(self, layer: torch.nn.Module) -> torch.Tensor:
        module, _, name = self.param.rpartition(".")
        value = getattr(layer.get_submodule(module), name)  # a parameter or a buffer (DeepSeek-V3's score bias)
        if self.expert is not None:
            value = value[self.expert]
        if self.rows is not None:
            value = value[self.rows]
        return value

    def set(self, layer: torch.nn.Module, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.get(layer).copy_(value)


def weight_slot(tensor: TensorInfo, inventory: ModelInventory) -> WeightSlot:
    """Where `tensor` (a decoder-layer tensor) lives in transformers' in-memory layer module."""
    relative = tensor.name[len(LAYER_PREFIX.format(i=tensor.layer)):]
    for old, new in inventory.family.memory_renames:
        relative = relative.replace(old, new)
    if tensor.role != "expert":
        return WeightSlot(relative)
    experts = relative.split(".experts.", 1)[0] + ".experts"
    inter = inventory.dims["expert_inter"]
    if tensor.proj == "down":
        return WeightSlot(f"{experts}.down_proj", tensor.expert)
    rows = slice(0, inter) if tensor.proj == "gate" else slice(inter, 2 * inter)
    return WeightSlot(f"{experts}.gate_up_proj", tensor.expert, rows)


class ShardReader:
    """Reads named tensors from a checkpoint's shards; one open handle per shard."""

    def __init__(self, inventory: ModelInventory):
        self.inventory = inventory
        self._handles: dict[str, object] = {}

    def read(self, tensor: TensorInfo) -> torch.Tensor:
        value = self.read_stored(tensor.shard, tensor.name)
        if value.is_floating_point() and not torch.isfinite(value.float()).all():
            raise CheckpointError(f"{Path(self.inventory.model_dir) / tensor.shard}: tensor {tensor.name} holds "
                                  "NaN or inf; the checkpoint is corrupt")
        return value

    def read_stored(self, shard: str, name: str) -> torch.Tensor:
        """Tensor `name` of file `shard` exactly as stored."""
        path = Path(self.inventory.model_dir) / shard
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(path), framework="pt")
        try:
            return self._handles[shard].get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for bad data
            raise CheckpointError(f"{path}: cannot read tensor {name} ({err})") from None

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """The decoder layer's state dict under transformers' in-memory names (experts fused)."""
        state: dict[str, torch.Tensor] = {}
        fused: dict[str, list] = {}
        for tensor in self.inventory.layer_tensors(layer):
            slot = weight_slot(tensor, self.inventory)
            value = self.read(tensor)
            if slot.expert is None:
                state[slot.param] = value
            else:
                fused.setdefault(slot.param, []).append((slot, value))
        for param, parts in fused.items():
            first = parts[0][1]
            rows = 1 if parts[0][0].rows is None else 2  # gate_up_proj stacks gate and up rows
            shape = (self.inventory.num_experts, first.shape[0] * rows, first.shape[1])
            stacked = torch.empty(shape, dtype=first.dtype)
            for slot, value in parts:
                target = stacked[slot.expert]
                (target if slot.rows is None else target[slot.rows]).copy_(value)
            state[param] = stacked
        return state
