"""Tensor-parallel padding (`--pad-intermediate-to N`): widen MLP intermediate sizes with zeros.

Engines shard an MLP's intermediate dimension I across tensor-parallel ranks: gate/up by rows, down by
input columns. Each rank's slice of a grouped down projection must be a whole number of groups, so
Qwen1.5-14B's I = 13696 cannot run int4 g128 on 8 GPUs (13696 / 8 = 1712 = 13.4 groups) until it is
padded to 14336 (1792 = 14 groups per rank).

Padding is exact for a SiLU-GLU MLP, down(silu(gate x) * up x): extra intermediate channels with zero
gate and up rows give silu(0) * 0 = 0, and their down columns are zero too, so no output changes.
It is a pure transformation of the per-tensor results moeq writes, applied after the solve:

    gate/up  W [N, K] -> [N', K]: new rows are zero (quantized: rows of a zero weight, q = zero point)
    down     W [N, K] -> [N, K']: new columns are zero (quantized: whole new groups of a zero weight,
             or, per channel, q = the row's own zero point); K' - K must be whole groups

A quantized zero weight is what `rtn` gives an all-zero block: q = zero point, the smallest float16
scale (quant_format's floor), so it dequantizes to exactly 0 in every engine.

Which sizes one N pads: the routed experts' (`expert_inter`), the dimension TP-sharded fused-MoE
kernels split and the case in practice (Qwen1.5-MoE's 1408 for TP 4 at g128). Dense and shared MLPs
are their own config.json keys with their own sizes, so one N for all of them would rarely mean
anything; pass a mapping {role: N} to pad them explicitly. Whatever config.json derives from a padded
key follows it: DeepSeek's shared experts are n_shared_experts x moe_intermediate_size wide (one MLP,
no key of their own), so padding the experts to N pads them to n_shared_experts x N, and DeepSeek-V3's
MTP layers (kept as stored) are padded like the decoder layers. N equal to a role's size leaves it
alone; N below it is an error, as is an N that would cut a quantized down projection mid-group.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from moeq.errors import MoeqError
from moeq.families import COMMON_DIMS, Family, TensorRule, model_dims
from moeq.inventory import LAYER_PREFIX, ModelInventory, TensorInfo
from moeq.quant_format import QuantizedTensor, rtn

PADDABLE_ROLES = ("expert", "shared_expert", "dense_mlp")  # SiLU-GLU MLPs: gate/up rows, down columns


class PaddingError(MoeqError):
    pass


@dataclass(frozen=True)
class PaddingSpec:
    """What padding changes: config.json keys, model dims, and the new shape of every tensor that grows."""

    config_updates: dict[str, int]         # config.json key -> new value, e.g. {"moe_intermediate_size": 1536}
    dims: dict[str, tuple[int, int]]       # model dim -> (old, new), e.g. {"expert_inter": (1408, 1536)}
    shapes: dict[str, tuple[int, ...]]     # tensor name -> padded shape (tensors that do not grow are absent)

    def shape_of(self, tensor: TensorInfo) -> tuple[int, ...]:
        return self.shapes.get(tensor.name, tensor.shape)

    def padded_info(self, tensor: TensorInfo) -> TensorInfo:
        """`tensor` with its padded shape."""
        return replace(tensor, shape=self.shape_of(tensor))


def pad_target(size: int, tp: int, group_size: int = 128) -> int:
    """The smallest N >= size that splits into `tp` shards of whole groups (group_size -1: any width)."""
    multiple = tp * (group_size if group_size > 0 else 1)
    return math.ceil(size / multiple) * multiple


def pad_plan(inventory: ModelInventory, target: int | Mapping[str, int],
             formats: Mapping[str, object] | None = None) -> PaddingSpec:
    """The PaddingSpec that widens intermediate sizes to `target`: an int pads the routed experts,
    a mapping {role: N} any of PADDABLE_ROLES. formats: tensor name -> its scheme or QuantFormat (None or
    bits 16 when kept), to refuse up front a size that would cut a quantized down projection mid-group."""
    targets = {"expert": target} if isinstance(target, int) and not isinstance(target, bool) else dict(target)
    family = inventory.family
    rules = {t.name: _rule_of(family, t, inventory.num_layers) for t in inventory.tensors}
    sources = {**COMMON_DIMS, **family.dims}
    config = copy.deepcopy(inventory.config)
    updates: dict[str, int] = {}
    for role, size in targets.items():
        if role not in PADDABLE_ROLES:
            raise PaddingError(f"cannot pad role {role!r}: padding widens SiLU-GLU MLPs ({', '.join(PADDABLE_ROLES)})")
        gate = next((t for t in inventory.tensors if t.role == role and t.proj == "gate"), None)
        if gate is None:
            raise PaddingError(f"{inventory.model_dir or family.name}: the model has no {role} MLP to pad")
        dim = rules[gate.name].shape[0]  # gate: [inter, hidden]
        current = inventory.dims[dim]
        if isinstance(size, bool) or not isinstance(size, int):
            raise PaddingError(f"pad size for {role} must be an integer, got {size!r}")
        if size < current:
            raise PaddingError(f"pad target {size} is smaller than the intermediate size {current} of {gate.module} "
                               f"({role}); padding only widens, give N >= {current}")
        if size == current:
            continue
        key = sources[dim]
        if not isinstance(key, str):
            raise PaddingError(f"{family.name}: the {role} intermediate size is computed from other config.json keys "
                               "and has no key of its own; pad what it follows (DeepSeek's shared experts follow "
                               "the experts)")
        updates[key] = size
        setattr(config, key, size)
    new_dims = model_dims(family, config)
    changed = {d: (inventory.dims[d], new_dims[d]) for d in new_dims if new_dims[d] != inventory.dims[d]}
    shapes = {}
    for t in inventory.tensors:
        shape = tuple(new_dims[d] for d in rules[t.name].shape)
        if shape == t.shape:
            continue
        if any(new < old for new, old in zip(shape, t.shape)):  # a dim shared with something padding shrinks
            raise PaddingError(f"padding would shrink {t.name} from {list(t.shape)} to {list(shape)}")
        fmt = (formats or {}).get(t.name)
        if fmt is not None and getattr(fmt, "bits", 16) != 16:
            _check_groups(t, shape, fmt.group_size)
        shapes[t.name] = shape
    return PaddingSpec(updates, changed, shapes)


def padded_config(config: dict, spec: PaddingSpec) -> dict:
    """config.json's contents with the padded sizes (a new dict; the input is not changed)."""
    return {**config, **spec.config_updates}


def pad_tensor(spec: PaddingSpec, tensor: TensorInfo, value):
    """`value` (a tensor of `tensor`'s shape, or a QuantizedTensor of it) padded to spec's shape; same type."""
    new = spec.shapes.get(tensor.name)
    if new is None:
        return value
    shape = tuple(value.q.shape if isinstance(value, QuantizedTensor) else value.shape)
    if shape != tensor.shape:
        raise PaddingError(f"{tensor.name}: got a value of shape {list(shape)}, the inventory says "
                           f"{list(tensor.shape)}")
    if isinstance(value, QuantizedTensor):
        return _pad_quantized(tensor, value, new)
    out = value.new_zeros(new)
    out[tuple(slice(0, s) for s in shape)] = value
    return out


def _pad_quantized(tensor: TensorInfo, value: QuantizedTensor, new: tuple[int, ...]) -> QuantizedTensor:
    # q: [N, K] -> [N', K']  scales, zeros: [N, G] -> [N', G']
    fmt = value.fmt
    if new[:-2] != tensor.shape[:-2]:
        raise PaddingError(f"{tensor.name}: only the last two dims of a quantized weight can be padded")
    *lead, n, k = tensor.shape
    q, scales, zeros = value.q, value.scales, value.zeros
    extra_k, extra_n = new[-1] - k, new[-2] - n
    if extra_k:
        if fmt.group_size == -1:  # one group per row: new columns take the row's own zero point
            q = torch.cat([q, zeros.expand(*lead, n, extra_k)], -1)
        else:
            _check_groups(tensor, new, fmt.group_size)
            filler = rtn(torch.zeros(*lead, n, extra_k, device=q.device), fmt)
            q, scales, zeros = (torch.cat(p, -1) for p in zip((q, scales, zeros), _parts(filler)))
    if extra_n:
        filler = rtn(torch.zeros(*lead, extra_n, new[-1], device=q.device), fmt)
        q, scales, zeros = (torch.cat(p, -2) for p in zip((q, scales, zeros), _parts(filler)))
    return QuantizedTensor(q.contiguous(), scales.contiguous(), zeros.contiguous(), fmt)


def _parts(t: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t.q, t.scales, t.zeros


def _check_groups(tensor: TensorInfo, new: tuple[int, ...], group_size: int) -> None:
    """Input columns may only grow by whole groups (so every TP shard of N' holds whole groups too)."""
    k, new_k = tensor.shape[-1], new[-1]
    if group_size != -1 and new_k != k and new_k % group_size:
        raise PaddingError(f"padding {tensor.module} from {k} to {new_k} input columns breaks its groups of "
                           f"{group_size}: {new_k} is not a multiple of {group_size}; choose a padded size that is")


def _rule_of(family: Family, tensor: TensorInfo, num_layers: int) -> TensorRule:
    """The family rule that gives `tensor` its shape (decoder, MTP or model-level)."""
    if tensor.layer is None:
        candidates, relative = family.model_tensors, tensor.name
    else:
        candidates = family.layer_tensors if tensor.layer < num_layers else family.extra_layer_tensors
        # under the layer prefix the only numeric component is the expert index
        relative = re.sub(r"(?<=\.)\d+(?=\.)", "{e}", tensor.name[len(LAYER_PREFIX.format(i=tensor.layer)):])
    for rule in candidates:
        if rule.template == relative and (rule.role == tensor.role or tensor.role == "mtp"):
            return rule
    raise PaddingError(f"{tensor.name}: no rule of family {family.name!r} gives its shape")
