"""Greedy decoding on a static KV cache, with the one-token decode step captured once in a CUDA graph.

Eager decoding of a kernel-backed model is launch-bound: at batch 1 each fused_moe call costs more host
time than GPU time. The decode step is therefore recorded once and replayed; per token the host only
writes the new token and its position into the step's static inputs.

Why the step never waits on the host (transformers 5.17 to 5.23; their models take no cache_position):
- StaticCache: fixed [B, kv_heads, L + n, head_dim] buffers, and each layer keeps its write offset in a
  device tensor that update() advances in place, so every replay writes the next slot.
- attention_mask=None: with a StaticCache and one query token, create_causal_mask never takes SDPA's
  `is_causal` shortcut (the cache is compileable) and builds the [B, 1, 1, L + n] mask from aranges
  and that device offset; there is no 2-D padding mask to read.
- position_ids: a static [B, 1] tensor, so nothing derives positions from the cache length.
Experts: transformers' eager loop (experts_implementation="eager") calls nonzero() and cannot be captured;
its default grouped_mm path has no host sync, nor has moeq's fused_moe (its grid is sized on the host).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from moeq.errors import GraphCaptureError

WARMUP_STEPS = 3  # Triton compiles, cuBLAS workspaces and lazy cache buffers happen here, never while capturing


def decode_step(model, cache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One greedy step: token, position [B, 1] -> next token [B]; writes this token's K/V into `cache`."""
    logits = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True).logits  # [B, 1, V]
    return logits[:, -1].argmax(-1)


def capture(step, cache, scratch) -> Callable[[], torch.Tensor]:
    """Record step(cache) in a CUDA graph, warmed up on `scratch` (a StaticCache of the same size, so the
    warm-up leaves `cache` untouched); returns replay() -> the graph's static output."""
    other = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if other:
        raise GraphCaptureError(f"the decode step cannot be replayed from a CUDA graph: cache layers {', '.join(other)} "
                                f"keep their length in Python (sliding window?); pass cuda_graph=False")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # torch.cuda.graphs requires the warm-up off the default stream
        for _ in range(WARMUP_STEPS):
            step(scratch)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step(cache)
    except Exception as err:  # capture_end's own error may mask the first one: name the first
        first = err
        while first.__context__ is not None:
            first = first.__context__
        reason = (str(first).strip().splitlines() or [type(first).__name__])[0]
        raise GraphCaptureError(f"capturing the decode step in a CUDA graph failed: {reason}. The step must not sync "
                                f"with the host (.item(), .tolist(), nonzero, data-dependent shapes; transformers' "
                                f"eager expert loop does); pass cuda_graph=False to decode eagerly") from err

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, cuda_graph: bool = True) -> torch.Tensor:
    """input_ids [B, L] -> [B, L + max_new_tokens]: greedy argmax, always max_new_tokens new tokens (no EOS stop).
    Prefill runs eagerly; on CUDA with cuda_graph=True every later token is one replay of a captured step."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    (B, L), device = input_ids.shape, input_ids.device
    cache = StaticCache(config=model.config, max_cache_len=L + max_new_tokens)
    out = torch.empty(B, L + max_new_tokens, dtype=torch.long, device=device)  # [B, L + n]
    out[:, :L] = input_ids
    with torch.no_grad():
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # [B, 1, V]
        out[:, L] = logits[:, -1].argmax(-1)
        token = out[:, L:L + 1].clone()  # [B, 1], static: the step reads it from the same address every time
        position = torch.full_like(token, L)  # [B, 1], static
        step = partial(decode_step, model, token=token, position=position)
        if cuda_graph and device.type == "cuda":
            run = capture(step, cache, StaticCache(config=model.config, max_cache_len=L + max_new_tokens))
        else:
            run = partial(step, cache)
        for i in range(L, L + max_new_tokens - 1):
            token.copy_(out[:, i:i + 1])
            position.fill_(i)
            out[:, i + 1] = run()
    return out
