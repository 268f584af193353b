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
from moeq.inventory import read_safetensors_header

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


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

    def finish(self, source_dir: Path, config: dict, expected: dict[str, tuple[tuple[int, ...], str]],
               sidecar: dict) -> Path:
        """Write index, config.json, copied tokenizer files and moeq.json; verify; rename into place."""
        weight_map, total = {}, 0
        for index in range(self.num_shards):
            name = shard_name(index, self.num_shards)
            header = read_safetensors_header(self.partial / name)
            for tensor, entry in header.items():
                weight_map[tensor] = name
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        for tensor, (shape, dtype) in expected.items():
            shard = weight_map.get(tensor)
            if shard is None:
                raise CheckpointError(f"{self.partial}: planned tensor {tensor} was not written")
            entry = read_safetensors_header(self.partial / shard)[tensor]
            if tuple(entry["shape"]) != tuple(shape) or entry["dtype"] != dtype:
                raise CheckpointError(f"{self.partial / shard}: {tensor} is {entry['dtype']} {entry['shape']}, "
                                      f"expected {dtype} {list(shape)}")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.partial / "config.json").write_text(json.dumps(config, indent=2))
        (self.partial / "moeq.json").write_text(json.dumps(sidecar, indent=1))
        for name in COPIED_FILES:
            if (source_dir / name).is_file():
                shutil.copy(source_dir / name, self.partial / name)
        for leftover in self.partial.glob("resume*"):
            leftover.unlink()
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.partial, self.out)
        return self.out
