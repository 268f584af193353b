"""Shared test fixtures: tiny random checkpoints of every family (paths and builders: support.py)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU machines (CI)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import EXAMPLES, TINY_CONFIGS, make_tiny_checkpoint, quantize_for_kernels  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_checkpoint(kind, root / kind) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_quantized(tmp_path_factory):
    """kind -> (source, quantized): the tiny random model of a family with the demo's tokenizer, and its checkpoint
    from the family's recipe as shipped but in groups of 32 (the tiny models' inputs are 32-128 wide). Built on
    first use."""
    from moeq.cli import default_recipe_name
    from moeq.families import family_for

    root = tmp_path_factory.mktemp("tiny-quantized")

    @functools.cache
    def build(kind: str) -> tuple[Path, Path]:
        source = make_tiny_checkpoint(kind, root / kind, tokenizer_of=EXAMPLES / "demo-mixtral")
        recipe = default_recipe_name(family_for(TINY_CONFIGS[kind]["model_type"]).name)
        return source, quantize_for_kernels(root / f"{kind}-q", ["defaults.group_size=32"], source, recipe)

    return build
