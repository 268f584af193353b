"""Calibration and evaluation token windows from text, jsonl or pre-tokenized files.

- `.txt` (or anything else): plain text, tokenized whole.
- `.jsonl`: one JSON object per line; its `text` field (or the field named by `text_field`) is used.
- `.pt` / `.safetensors`: pre-tokenized, a LongTensor of token ids ([N] or [S, L]; the tensor
  `input_ids` in a safetensors file).
Calibration takes `samples` windows of `seq_len` tokens at seeded random offsets; evaluation takes
consecutive non-overlapping windows from the start.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeq.errors import MoeqError


def read_token_stream(path: str | Path, tokenizer, text_field: str = "text") -> torch.Tensor:
    """All token ids of a file as one 1-D LongTensor."""
    path = Path(path)
    if not path.is_file():
        raise MoeqError(f"{path}: calibration/evaluation file not found")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".safetensors"):
        if suffix == ".pt":
            ids = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            tensors = load_file(path)
            if "input_ids" not in tensors:
                raise MoeqError(f"{path}: a pre-tokenized safetensors file must hold a tensor named input_ids")
            ids = tensors["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise MoeqError(f"{path}: pre-tokenized input must be an integer tensor of token ids")
        return ids.reshape(-1).long()
    if suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MoeqError(f"{path}:{n}: not valid JSON ({err})") from None
            if text_field not in record:
                raise MoeqError(f"{path}:{n}: no field {text_field!r}; pass --text-field with the right name")
            texts.append(record[text_field])
        text = "\n\n".join(texts)
    else:
        text = path.read_text()
    return torch.tensor(_token_ids(tokenizer, text), dtype=torch.long)


def _token_ids(tokenizer, text: str) -> list[int]:
    """tokenizer(text)["input_ids"]. A fast (Rust) tokenizer is asked for the ids alone, without the
    character offsets that tokenizer(...) tracks and nobody reads here: the same ids in half the time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(text, return_attention_mask=False)["input_ids"]
    return backend.encode_batch_fast([text])[0].ids


def calibration_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets: [samples, seq_len]."""
    if stream.numel() < seq_len:
        raise MoeqError(f"calibration text has {stream.numel()} tokens, fewer than one window of {seq_len}; "
                        "give more text or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def evaluation_windows(stream: torch.Tensor, windows: int, seq_len: int) -> torch.Tensor:
    """Up to `windows` consecutive non-overlapping windows of `seq_len` tokens: [n, seq_len]."""
    n = min(windows, stream.numel() // seq_len)
    if n == 0:
        raise MoeqError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def coverage_advice(num_params: int, samples: int, seq_len: int) -> list[str]:
    """Warnings against the common guidance: >= 128 samples per 7B parameters, 1024+ tokens for large models."""
    advice = []
    wanted = max(128, round(128 * num_params / 7e9))
    if samples < wanted:
        advice.append(f"{samples} calibration samples for {num_params / 1e9:.1f}B parameters; the usual guidance "
                      f"is at least 128 per 7B, i.e. {wanted} here (--calib-samples)")
    if num_params >= 1e9 and seq_len < 1024:
        advice.append(f"sequence length {seq_len}; models of this size calibrate better with 1024 or more (--seq-len)")
    return advice
