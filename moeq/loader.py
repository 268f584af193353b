"""Reading a quantized checkpoint back: `moeq.load` and the checks behind `moeq inspect`.

A checkpoint folder holds the upstream tensor names of its family, each linear weight either as it is
(kept) or packed (GPTQ `qweight/qzeros/scales/g_idx`, compressed-tensors `weight_packed/weight_scale/
weight_zero_point/weight_shape`). What each module holds is read from config.json's quantization_config,
never from file names; every tensor must be explained and agree with config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeq.errors import CheckpointError
from moeq.formats import Scheme, compressed_tensors, gptq
from moeq.inventory import TORCH_DTYPES, TensorInfo, checkpoint_shards, inventory_from_config, read_safetensors_header
from moeq.quant_format import QuantFormat, QuantizedTensor
from moeq.shards import ShardReader

PACKED = {  # quant_method -> (format module, tensor suffixes of a packed module)
    "gptq": (gptq, ("qweight", "qzeros", "scales", "g_idx")),
    "compressed-tensors": (compressed_tensors, ("weight_packed", "weight_scale", "weight_shape",
                                                "weight_zero_point")),
}


class StoredCheckpoint(ShardReader):
    """The original tensors of a (possibly quantized) checkpoint; `read` returns them dequantized."""

    def __init__(self, path: str | Path):
        path = Path(path)
        raw_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        header = raw_config.get("quantization_config")
        self.method = header.get("quant_method") if header else None
        if self.method is not None and self.method not in PACKED:
            raise CheckpointError(f"{path / 'config.json'}: quant_method {self.method!r} is not one moeq reads "
                                  f"({', '.join(PACKED)})")
        self.format_module, suffixes = PACKED.get(self.method, (None, ()))
        self.resolve = self.format_module.read_quantization_config(header) if header else (lambda name: None)
        self.checkpoint_format = (header or {}).get("checkpoint_format") or "gptq"
        expected = inventory_from_config(path)
        weight_map = checkpoint_shards(path)
        self.headers = {shard: read_safetensors_header(path / shard) for shard in sorted(set(weight_map.values()))}
        self.schemes: dict[str, Scheme | None] = {}
        tensors, explained = [], set()
        for t in expected.tensors:
            scheme = self.resolve(t.module) if t.quantizable else None
            # a packed module's parts (some optional, e.g. zero points of symmetric schemes) are checked on unpack
            names = [f"{t.module}.{s}" for s in suffixes if f"{t.module}.{s}" in weight_map] if scheme else [t.name]
            if not names or any(n not in weight_map for n in names):
                if t.role == "mtp" and not any(k.startswith(f"model.layers.{t.layer}.") for k in weight_map):
                    continue  # optional MTP layer, absent as a whole
                raise CheckpointError(f"{path}: {t.module} should hold "
                                      f"{'packed ' + str(scheme) if scheme else 'tensor ' + t.name} per config.json, "
                                      f"but {', '.join(n for n in names if n not in weight_map) or 'it'} is missing")
            if scheme is None:
                entry = self.headers[weight_map[t.name]][t.name]
                if tuple(entry["shape"]) != t.shape:
                    raise CheckpointError(f"{path / weight_map[t.name]}: {t.name} has shape {entry['shape']}, "
                                          f"config.json implies {list(t.shape)}")
            explained.update(names)
            self.schemes[t.name] = scheme
            tensors.append(TensorInfo(t.name, t.shape, t.dtype if scheme else
                                      self.headers[weight_map[t.name]][t.name]["dtype"], t.role, t.proj, t.layer,
                                      t.expert, weight_map[names[0]]))
        unexplained = sorted(set(weight_map) - explained)
        if unexplained:
            raise CheckpointError(f"{path}: {len(unexplained)} tensor(s) that config.json and its quantization_config "
                                  f"do not explain, e.g. {', '.join(unexplained[:3])}")
        super().__init__(type(expected)(path, expected.family, expected.config, expected.dims, tuple(tensors)))
        self.weight_map = weight_map
        self.path = path

    def packed(self, tensor: TensorInfo) -> QuantizedTensor | None:
        """The stored integers, scales and zero points of a quantized tensor (None when kept)."""
        scheme = self.schemes[tensor.name]
        if scheme is None:
            return None
        _, suffixes = PACKED[self.method]
        names = {s: f"{tensor.module}.{s}" for s in suffixes if f"{tensor.module}.{s}" in self.weight_map}
        parts = {s: self.read_stored(self.weight_map[name], name) for s, name in names.items()}
        extra = {"checkpoint_format": self.checkpoint_format} if self.method == "gptq" else {}
        try:
            q, scales, zeros = self.format_module.unpack(parts, scheme.bits, scheme.group_size, scheme.sym, **extra)
        except CheckpointError as err:
            raise CheckpointError(f"{self.path}: {tensor.module}: {err}") from None
        if tuple(q.shape) != tensor.shape:
            raise CheckpointError(f"{self.path}: {tensor.module} unpacks to {list(q.shape)}, config.json implies "
                                  f"{list(tensor.shape)}")
        return QuantizedTensor(q, scales, zeros, QuantFormat(scheme.bits, scheme.group_size, scheme.sym))

    def verify(self) -> None:
        """Unpack every quantized tensor once: every packed part present, of the shape and dtype its scheme
        and config.json imply (kept tensors were checked against their headers on construction)."""
        for t in self.inventory.tensors:
            self.packed(t)

    def read(self, tensor: TensorInfo) -> torch.Tensor:
        quantized = self.packed(tensor)
        if quantized is None:
            return super().read(tensor)
        return quantized.dequantize().to(TORCH_DTYPES[tensor.dtype])


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, kernels: bool | None = None):
    """A transformers model of the checkpoint at `path` that runs. On the CPU (and with kernels=False) it is
    the reference path: weights dequantized once at load time. On CUDA (kernels default True) quantized
    4/8-bit modules run on moeq's Triton kernels, repacked once here."""
    from moeq.pipeline import build_skeleton, compute_dtype, load_layer
    from moeq.runtime import swap_in_kernels
    from moeq.shards import weight_slot

    checkpoint = StoredCheckpoint(path)
    device = torch.device(device)
    dtype = dtype or compute_dtype(device)
    kernels = device.type == "cuda" if kernels is None else kernels
    inventory = checkpoint.inventory
    if kernels and (inventory.config.hidden_act != "silu" or dtype not in (torch.bfloat16, torch.float16)):
        raise CheckpointError(f"{path}: the kernels run SiLU experts with bf16/fp16 activations; "
                              f"this model has {inventory.config.hidden_act} and dtype {dtype}: pass kernels=False")
    model = build_skeleton(inventory.config, device, dtype, use_cache=True)
    for i in range(inventory.num_layers):
        layer = load_layer(model, checkpoint, i, device, dtype)
        if kernels:
            swap_in_kernels(layer, inventory.layer_tensors(i), checkpoint.packed, lambda t: weight_slot(t, inventory),
                            inventory.num_experts, device)
    for t in inventory.tensors:
        if t.layer is None:
            module_path, param = t.name.rsplit(".", 1)
            setattr(model.get_submodule(module_path), param,
                    torch.nn.Parameter(checkpoint.read(t).to(device, dtype), requires_grad=False))
    if "lm_head.weight" not in inventory.by_name:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    return model.eval()
