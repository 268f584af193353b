"""Writing a quantized checkpoint: shard by shard into `OUT.partial/`, renamed to `OUT` only when complete.

A half-written checkpoint never sits at OUT: a run that dies leaves `OUT.partial/` (which `--resume`
continues from) and OUT untouched. After writing, every shard's header is re-read and every expected
tensor is checked for presence, shape and dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeq.errors import CheckpointError
from moeq.formats import compressed_tensors, gptq
from moeq.inventory import TORCH_DTYPES, TensorInfo, read_safetensors_header
from moeq.quant_format import QuantizedTensor

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


# --format: packed formats engines load, or plain dequantized weights (any tool loads them, no saving)
PACKED_FORMATS = {"gptq": gptq, "compressed-tensors": compressed_tensors}
OUTPUT_FORMATS = (*PACKED_FORMATS, "dequantized")


def stored_tensors(fmt: str, tensor: TensorInfo, value: torch.Tensor | None, quantized: QuantizedTensor | None,
                   checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """What the checkpoint holds for one planned tensor: itself when kept, else its packed tensors."""
    if quantized is None:
        return {tensor.name: value.detach().to(TORCH_DTYPES[tensor.dtype])}
    if fmt == "dequantized":
        return {tensor.name: quantized.dequantize().to(TORCH_DTYPES[tensor.dtype])}
    f = quantized.fmt
    extra = {"checkpoint_format": checkpoint_format} if fmt == "gptq" else {}
    packed = PACKED_FORMATS[fmt].pack(quantized.q, quantized.scales, quantized.zeros, f.bits, f.group_size, f.sym,
                                      **extra)
    return {f"{tensor.module}.{key}": value for key, value in packed.items()}


def gptq_checkpoint_format(schemes) -> str:
    """v1 ("gptq", what every GPTQ loader assumes) when all schemes are symmetric; v2 stores asymmetric
    zero points exactly (v1's zero - 1 cannot hold a zero of 0 for vLLM's kernels)."""
    return "gptq" if all(s.sym for s in schemes if s is not None) else "gptq_v2"


def quantization_config(fmt: str, per_module: dict) -> dict | None:
    """config.json's quantization_config for the output format; per_module: module -> scheme or None (kept)."""
    if fmt == "dequantized":
        return None
    if fmt == "gptq":
        return gptq.quantization_config(per_module, checkpoint_format=gptq_checkpoint_format(per_module.values()))
    return PACKED_FORMATS[fmt].quantization_config(per_module)


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class CheckpointWriter:
    """Shards go to OUT.partial/ as they are produced; `finish` writes the index and config, checks, renames."""

    def __init__(self, out: str | Path, num_shards: int, *, force: bool = False, resume: bool = False):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.num_shards = num_shards
        if self.out.exists() and not force:
            raise CheckpointError(f"{self.out} exists; pass --force to replace it or choose another --out")
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value.float()).all():
                raise CheckpointError(f"refusing to write {name}: it holds NaN or inf")
        path = self.partial / shard_name(index, self.num_shards)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)

    def _reread(self) -> tuple[dict[str, str], int]:
        """tensor -> shard and total bytes, from the headers on disk."""
        weight_map, total = {}, 0
        for index in range(self.num_shards):
            name = shard_name(index, self.num_shards)
            path = self.partial / name
            if not path.is_file():
                raise CheckpointError(f"{path}: shard was never written; rerun with --resume")
            for tensor, entry in read_safetensors_header(path).items():
                weight_map[tensor] = name
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        return weight_map, total

    def finish(self, source_dir: Path, config: dict, sidecar: dict) -> Path:
        """Write index, config.json, copied tokenizer files and moeq.json; verify; rename into place."""
        weight_map, total = self._reread()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.partial / "config.json").write_text(json.dumps(config, indent=2))
        (self.partial / "moeq.json").write_text(json.dumps(sidecar, indent=1))
        for name in COPIED_FILES:
            if (source_dir / name).is_file():
                shutil.copy(source_dir / name, self.partial / name)
        from moeq.loader import StoredCheckpoint

        StoredCheckpoint(self.partial).verify()  # every planned tensor present, explained, shaped as config.json says
        for leftover in self.partial.glob("resume*"):
            leftover.unlink()
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.partial, self.out)
        return self.out
