"""Shared test fixtures: tiny random checkpoints of every family (paths and builders: support.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU machines (CI)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import TINY_CONFIGS, make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_checkpoint(kind, root / kind) for kind in TINY_CONFIGS}
