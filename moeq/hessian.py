"""Routed Hessians: the input second moment of every expert of a layer, from the tokens routed to it.

For one linear input space (say the input of all experts' gate/up projections in a layer) with E experts:

    H_sum       float32 [E, K, K]   sum over routing pairs (t, e) of w_p x_t x_t^T, into expert e only
    counts      int64   [E]         routing pairs (= tokens) each expert received
    weight_sums float64 [E]         sum of pair weights w_p (= counts unless gate-weighted)

The mean Hessian H_e = H_sum[e] / weight_sums[e] is what GPTQ needs (its loss tr(dW H dW^T) / N is then
the mean squared output error per output element). Weighting each pair by its gate score is MoEQuant's
AGQ: tokens the router barely sends count less. A plain linear is E = 1 with every token routed to it.

Starved experts (fewer than `min_tokens` tokens, and always those with none) get a documented policy:
    "shrink": H = (n H_e + (min_tokens - n) H_layer) / min_tokens, H_layer the pooled mean of all experts,
              so a zero-token expert is solved with exactly H_layer;
    "rtn":    marked for round-to-nearest in the report; H = H_layer so the batched solve still runs, and
              the caller replaces that expert's result with RTN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeq.errors import MoeqError

STARVED_POLICIES = ("shrink", "rtn")


@dataclass(frozen=True)
class ExpertHessianReport:
    """What finalize did for one expert."""

    expert: int
    tokens: int
    policy: str | None  # None: enough tokens | "shrink" | "rtn"


class RoutedHessian:
    """Accumulates X^T X per expert from (token, expert) routing pairs."""

    def __init__(self, num_experts: int, in_features: int, *, device=None):
        self.num_experts, self.in_features = num_experts, in_features
        self.H_sum = torch.zeros(num_experts, in_features, in_features, dtype=torch.float32, device=device)
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.weight_sums = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self._weighted = Scratch()  # gate-weighted copy of each batch's pairs

    def add(self, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor,
            pair_weight: torch.Tensor | None = None) -> None:
        """Add routing pairs: x [T, K] (any float dtype), token_idx / expert_idx / pair_weight [P].

        Pair p adds pair_weight[p] * x[token_idx[p]] x[token_idx[p]]^T to expert expert_idx[p] only.
        """
        device = self.H_sum.device
        x = x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
        token_idx = token_idx.reshape(-1).to(device=device, dtype=torch.long)
        expert_idx = expert_idx.reshape(-1).to(device=device, dtype=torch.long)
        if token_idx.shape != expert_idx.shape:
            raise ValueError(f"token_idx {tuple(token_idx.shape)} and expert_idx {tuple(expert_idx.shape)} "
                             f"must both be [P]")
        if pair_weight is not None and pair_weight.numel() != expert_idx.numel():
            raise ValueError(f"pair_weight {tuple(pair_weight.shape)} must be [P] = {tuple(expert_idx.shape)}")
        order, counts = group_by_expert(expert_idx, self.num_experts)
        self.add_grouped(x[token_idx[order]], counts,
                         None if pair_weight is None else pair_weight.reshape(-1).to(device)[order])

    def add_grouped(self, xs: torch.Tensor, counts: torch.Tensor, pair_weight: torch.Tensor | None = None) -> None:
        """Add routing pairs already grouped by expert: xs [P, K] holds expert 0's counts[0] pairs, then
        expert 1's, ...; counts [E]; pair_weight [P] in the same order. One matmul per expert, no copy of xs
        when it is float32 and unweighted."""
        device = self.H_sum.device
        xs = xs.reshape(-1, xs.shape[-1]).to(device=device, dtype=torch.float32)
        counts = counts.to(device=device, dtype=torch.long)
        if xs.shape[1] != self.in_features:
            raise ValueError(f"x has {xs.shape[1]} features, this Hessian was made for K={self.in_features}")
        if counts.shape != (self.num_experts,) or int(counts.sum()) != xs.shape[0]:
            raise ValueError(f"counts {counts.tolist()} must be [E={self.num_experts}] and sum to the "
                             f"{xs.shape[0]} pairs of x")
        if pair_weight is None:
            self.weight_sums += counts
        else:
            w = pair_weight.reshape(-1).to(device=device, dtype=torch.float32)
            if w.shape != (xs.shape[0],):
                raise ValueError(f"pair_weight {tuple(w.shape)} must be [P] = ({xs.shape[0]},)")
            if (w < 0).any():
                raise ValueError("pair_weight must be >= 0 (gate scores); a negative weight breaks H >= 0")
            experts = torch.repeat_interleave(torch.arange(self.num_experts, device=device), counts)
            self.weight_sums += torch.bincount(experts, weights=w.double(), minlength=self.num_experts)
            # sqrt on both sides keeps each H_e symmetric
            xs = torch.mul(xs, w.sqrt().unsqueeze(1), out=self._weighted.take(xs.shape, xs.dtype, device))
        self.counts += counts
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                _add_gram(self.H_sum[e], xs[start:start + n])
                start += n

    def finalize(self, min_tokens: int = 0, policy: str = "shrink") -> tuple[torch.Tensor, tuple[ExpertHessianReport, ...]]:
        """(H float32 [E, K, K] mean Hessians, one report per expert) with the starved-expert policy applied.

        Does not change the accumulator. Raises MoeqError when no expert of the layer received a token.
        """
        if policy not in STARVED_POLICIES:
            raise ValueError(f"starved-expert policy {policy!r} is unknown; allowed: {', '.join(STARVED_POLICIES)}")
        if min_tokens < 0:
            raise ValueError(f"min_tokens={min_tokens} must be >= 0")
        total = self.weight_sums.sum()
        if int(self.counts.sum()) == 0 or total <= 0:
            raise MoeqError(f"no calibration tokens reached any of the {self.num_experts} experts of this layer "
                            f"(K={self.in_features}); use more or longer calibration text")
        if not torch.isfinite(self.H_sum).all():
            bad = (~torch.isfinite(self.H_sum)).flatten(1).any(1).nonzero().flatten().tolist()
            raise MoeqError(f"non-finite calibration activations reached experts {bad}; the model's forward "
                            f"overflowed (try float32 calibration)")
        h_layer = self.H_sum.sum(0).div_(total.float())  # pooled mean: [K, K]
        counts = self.counts.tolist()
        weights = self.weight_sums.tolist()
        starved = [n < max(min_tokens, 1) or weights[e] <= 0 for e, n in enumerate(counts)]
        H = self.H_sum.clone()  # one copy; everything below is in place per expert
        for e, n in enumerate(counts):
            if not starved[e]:
                H[e].div_(weights[e])
            elif policy == "shrink" and n > 0 and weights[e] > 0:
                alpha = n / min_tokens  # n < min_tokens here
                H[e].div_(weights[e]).mul_(alpha).add_(h_layer, alpha=1.0 - alpha)
            else:  # zero tokens, or policy "rtn": the layer mean keeps the batched solve well posed
                H[e].copy_(h_layer)
        reports = tuple(ExpertHessianReport(e, n, policy if starved[e] else None) for e, n in enumerate(counts))
        return H, reports


class Scratch:
    """A buffer reused from batch to batch. A fresh allocation of tens of MB is mapped from the OS and
    page-faulted in every time (1.8 us per 4 KiB page on the 2-core development VM: 15 ms for 32 MiB);
    reusing one is free."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor of `shape`, a view of the buffer (grown when too small); valid until the
        next take."""
        numel = math.prod(shape)
        b = self._buffer
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != torch.device(device):
            self._buffer = b = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel].view(shape)


def _add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h [K, K] += x^T x for x [n, K] with 3/4 of the flops: x^T x is symmetric, so the left half of the
    columns and the lower-right block are multiplied and the upper-right block is their mirror."""
    half = x.shape[1] // 2
    h[:, :half].addmm_(x.T, x[:, :half])
    h[half:, half:].addmm_(x[:, half:].T, x[:, half:])
    h[:half, half:] = h[half:, :half].T


def group_by_expert(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [P], counts [E]): expert_idx[order] is sorted, pairs of one expert kept in their order."""
    if expert_idx.numel():
        lo, hi = torch.aminmax(expert_idx)
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_idx must be in [0, {num_experts}), got [{int(lo)}, {int(hi)}]")
    return torch.argsort(expert_idx, stable=True), torch.bincount(expert_idx, minlength=num_experts)
