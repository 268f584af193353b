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

    def add(self, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor,
            pair_weight: torch.Tensor | None = None) -> None:
        """Add routing pairs: x [T, K] (any float dtype), token_idx / expert_idx / pair_weight [P].

        Pair p adds pair_weight[p] * x[token_idx[p]] x[token_idx[p]]^T to expert expert_idx[p] only.
        """
        device = self.H_sum.device
        x = x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
        if x.shape[1] != self.in_features:
            raise ValueError(f"x has {x.shape[1]} features, this Hessian was made for K={self.in_features}")
        token_idx = token_idx.reshape(-1).to(device=device, dtype=torch.long)
        expert_idx = expert_idx.reshape(-1).to(device=device, dtype=torch.long)
        if token_idx.shape != expert_idx.shape:
            raise ValueError(f"token_idx {tuple(token_idx.shape)} and expert_idx {tuple(expert_idx.shape)} "
                             f"must both be [P]")
        if expert_idx.numel() == 0:
            return
        lo, hi = torch.aminmax(expert_idx)
        if lo < 0 or hi >= self.num_experts:
            raise ValueError(f"expert_idx must be in [0, {self.num_experts}), got [{int(lo)}, {int(hi)}]")
        # Group pairs by expert: one gather, then one matmul per expert that received any.
        order = torch.argsort(expert_idx, stable=True)
        counts = torch.bincount(expert_idx, minlength=self.num_experts)
        xs = x[token_idx[order]]  # [P, K] in expert order
        if pair_weight is None:
            self.weight_sums += counts
        else:
            w = pair_weight.reshape(-1).to(device=device, dtype=torch.float32)
            if w.shape != expert_idx.shape:
                raise ValueError(f"pair_weight {tuple(w.shape)} must be [P] = {tuple(expert_idx.shape)}")
            if (w < 0).any():
                raise ValueError("pair_weight must be >= 0 (gate scores); a negative weight breaks H >= 0")
            self.weight_sums += torch.bincount(expert_idx, weights=w.double(), minlength=self.num_experts)
            xs = xs * w[order].sqrt().unsqueeze(1)  # sqrt on both sides keeps each H_e symmetric
        self.counts += counts
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                chunk = xs[start:start + n]
                self.H_sum[e].addmm_(chunk.T, chunk)
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
