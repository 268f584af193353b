"""Quality checks: perplexity from final hidden states, and a greedy generation flagged when degenerate."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

PROMPTS = ("The kernel", "def main(", "In Python, a list")


def _perplexity(logits_and_ids) -> float:
    """exp(mean next-token NLL) over (logits [B, L, V], ids [B, L]) batches."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for logits, ids in logits_and_ids:
            logits = logits.float()
            labels = ids.to(logits.device)[:, 1:]
            total_nll += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"))
            total_tokens += labels.numel()
    return math.exp(total_nll / total_tokens)


def perplexity(final_hidden: list[torch.Tensor], token_batches: list[torch.Tensor], norm, lm_head) -> float:
    """exp(mean next-token NLL) over every window; final_hidden[i]: [B, L, H] before the final norm."""
    return _perplexity((lm_head(norm(hidden)), ids) for hidden, ids in zip(final_hidden, token_batches))


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    token_ids: tuple[int, ...]
    degenerate: bool


def is_degenerate(token_ids: list[int]) -> bool:
    """One token dominating (>= 60% of the new tokens), or the last 8 tokens all the same id."""
    if not token_ids:
        return True
    top = Counter(token_ids).most_common(1)[0][1]
    tail = token_ids[-8:]
    return top / len(token_ids) >= 0.6 or (len(tail) == 8 and len(set(tail)) == 1)


def greedy_generations(model, tokenizer, prompts=PROMPTS, new_tokens: int = 24) -> list[Generation]:
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id or 0)
            new = generated[0, ids.shape[1]:].tolist()
            out.append(Generation(prompt, tokenizer.decode(new), tuple(new), is_degenerate(new)))
    return out


def load_for_generation(path, device: str = "auto"):
    """The written checkpoint, loaded by moeq.load, and its tokenizer."""
    from transformers import AutoTokenizer

    from moeq.loader import load
    from moeq.quantize import resolve_device

    return load(path, resolve_device(device)), AutoTokenizer.from_pretrained(path)


def model_perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) of a whole model over token windows [n, L] (the same measure as `perplexity`)."""
    device = next(model.parameters()).device
    return _perplexity((model(input_ids=ids.to(device)).logits, ids) for ids in windows.split(batch_size))
