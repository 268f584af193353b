"""GPTQ for all experts of a layer at once: one pure function, experts as the batch dimension.

The algorithm is IST-DASLab's `fasterquant` (Frantar et al., 2022): columns are quantized left to right;
each column's rounding error, divided by the diagonal of U (the upper Cholesky factor of the inverse
Hessian), is fed back into the columns not yet quantized, lazily in blocks of `block_size` columns.
Every step is a batched tensor op over the expert dimension E (batched Cholesky, matmuls), never a
Python loop over experts. Differences from the reference code, all deliberate:
  - dead input columns (diag(H) == 0) are rounded to nearest instead of zeroed: a rarely routed expert
    must not lose weights because its few tokens never touched a feature;
  - damping is relative to the mean diagonal of the live columns, and raised x10 per expert whose
    Cholesky fails (reported in `damp`), so one ill-conditioned expert does not fail the layer;
  - group scales are fitted on fully error-updated columns (blocks are aligned to whole groups);
  - with act_order the groups are static (fitted on the original weight's contiguous groups), so the
    result needs no runtime permutation (see moeq.quant_format for the stored convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeq.quant_format import QuantFormat, QuantizedTensor

_DAMP_TRIES = 8            # damping may grow by up to 10**7 before we give up
_DAMP_WHEN_ZERO = 1e-6     # first retry's relative damping when the caller asked for damp=0


@dataclass(frozen=True)
class GPTQResult:
    """Quantized weights in the stored convention and per-expert diagnostics (leading E dim dropped
    when the input W was [N, K])."""

    q: torch.Tensor             # uint8 [E, N, K], original column order
    scales: torch.Tensor        # float16 [E, N, G]
    zeros: torch.Tensor         # uint8 [E, N, G]
    loss: torch.Tensor          # [E] tr(dW H dW^T) / N with the undamped H: mean squared output error
    rel_loss: torch.Tensor      # [E] tr(dW H dW^T) / tr(W H W^T)
    damp: torch.Tensor          # [E] relative damping actually used
    dead_columns: torch.Tensor  # [E] int64, input columns with diag(H) == 0
    fmt: QuantFormat

    @property
    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.q, self.scales, self.zeros, self.fmt)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: QuantFormat, *, act_order: bool = False,
                  damp: float = 0.01, block_size: int = 128) -> GPTQResult:
    """Quantize W [E, N, K] (or [N, K]) given mean Hessians H [E, K, K] (or [K, K]); inputs untouched."""
    squeeze = W.dim() == 2
    if squeeze:
        W, H = W.unsqueeze(0), H.unsqueeze(0)
    if W.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"expected W [E, N, K] and H [E, K, K], got W {tuple(W.shape)} and H {tuple(H.shape)}")
    if damp < 0 or block_size <= 0:
        raise ValueError(f"damp={damp} must be >= 0 and block_size={block_size} > 0")
    E, N, K = W.shape
    G = fmt.num_groups(K)
    gs = fmt.group_width(K)
    dev = W.device
    H = H.to(device=dev, dtype=torch.float32)
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf")
    w_orig = W.float()

    # --- Hessian preparation: permute, isolate dead columns, damp, factor -------------------------------
    diag = H.diagonal(dim1=-2, dim2=-1)                                      # [E, K]
    dead = diag == 0
    live = (~dead).sum(-1)
    mean_diag = torch.where(live > 0, diag.sum(-1) / live.clamp_min(1), torch.ones_like(diag[:, 0]))
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)      # [E, K]
        Hp = H.gather(1, perm[:, :, None].expand(E, K, K)).gather(2, perm[:, None, :].expand(E, K, K))
    else:
        perm = torch.arange(K, device=dev).expand(E, K)
        Hp = H.clone()
    dead_p = dead.gather(1, perm)
    # A dead column gets diag 1 and no off-diagonal coupling, so its error propagates nowhere.
    Hp.masked_fill_(dead_p[:, :, None] | dead_p[:, None, :], 0.0)
    Hp.diagonal(dim1=-2, dim2=-1).masked_fill_(dead_p, 1.0)
    U, rel_damp = _inverse_hessian_factor(Hp, mean_diag, damp)
    del Hp

    # --- scales for static groups (per channel, or act_order): fitted on the original weight -----------
    refit = gs < K and not act_order  # group-wise: fit each group on its error-updated columns
    if refit:
        scales = torch.empty(E, N, G, dtype=torch.float32, device=dev)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = (t.float() for t in fmt.fit(w_orig))
    col_group = perm // gs                                                     # [E, K] group of each solve column

    # --- the solve, in permuted order, lazy blocks aligned to whole groups ------------------------------
    Wp = w_orig.gather(2, perm[:, None, :].expand(E, N, K))                   # [E, N, K] working copy
    Q = torch.empty(E, N, K, dtype=torch.uint8, device=dev)
    B = block_size if gs >= K else max(1, block_size // gs) * gs
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = Wp[:, :, i1:i2].clone()                                          # [E, N, b]
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]                                               # [E, b, b]
        d1 = U1.diagonal(dim1=-2, dim2=-1)                                    # [E, b]
        if refit:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
        else:
            idx = col_group[:, None, i1:i2].expand(E, N, i2 - i1)
            S1, Z1 = scales.gather(2, idx), zeros.gather(2, idx)
        for i in range(i2 - i1):
            if refit and i % gs == 0:
                s, z = fmt.fit_group(W1[:, :, i:i + gs])                      # [E, N]
                g = (i1 + i) // gs
                scales[:, :, g], zeros[:, :, g] = s, z
                S1[:, :, i:i + gs], Z1[:, :, i:i + gs] = s[:, :, None], z[:, :, None]
            w, s, z = W1[:, :, i], S1[:, :, i], Z1[:, :, i]
            q = fmt.encode(w, s, z)
            err = (w - fmt.decode(q, s, z)) / d1[:, None, i]                  # [E, N]
            W1[:, :, i:].addcmul_(err[:, :, None], U1[:, None, i, i:], value=-1.0)
            Q1[:, :, i], Err1[:, :, i] = q, err
        Q[:, :, i1:i2] = Q1.to(torch.uint8)
        if i2 < K:
            Wp[:, :, i2:].baddbmm_(Err1, U[:, i1:i2, i2:], alpha=-1.0)

    # --- back to original column order, and the loss with the undamped Hessian ---------------------------
    if act_order:
        inv = torch.argsort(perm, dim=-1)
        Q = Q.gather(2, inv[:, None, :].expand(E, N, K))
    scales16, zeros8 = scales.to(torch.float16), zeros.to(torch.uint8)
    delta = fmt.dequantize(Q, scales16, zeros8) - w_orig
    loss = _energy(delta, H)
    base = _energy(w_orig, H)
    rel_loss = torch.where(base > 0, loss / base.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(loss))
    out = dict(q=Q, scales=scales16, zeros=zeros8, loss=loss / N, rel_loss=rel_loss, damp=rel_damp,
               dead_columns=dead.sum(-1))
    if squeeze:
        out = {k: v[0] for k, v in out.items()}
    return GPTQResult(**out, fmt=fmt)


def _energy(m: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr(m H m^T) per expert: m [E, N, K], H [E, K, K] -> [E]."""
    return (torch.bmm(m, H) * m).sum((1, 2))


def _inverse_hessian_factor(Hp: torch.Tensor, mean_diag: torch.Tensor, damp: float):
    """(U [E, K, K] upper Cholesky factor of (Hp + lambda I)^-1, relative damping used [E]).

    lambda = rel * mean_diag per expert. Experts whose factorization fails (not numerically positive
    definite: rank-deficient calibration, too few tokens) are retried alone with rel x 10.
    Hp's diagonal is overwritten (it is the caller's scratch copy).
    """
    E = Hp.shape[0]
    base_diag = Hp.diagonal(dim1=-2, dim2=-1).clone()
    rel = torch.full((E,), float(damp), dtype=torch.float32, device=Hp.device)
    todo = torch.arange(E, device=Hp.device)
    U = None
    for _ in range(_DAMP_TRIES):
        sub = Hp if todo.numel() == E else Hp[todo]  # retries copy only the failed experts
        sub.diagonal(dim1=-2, dim2=-1).copy_(base_diag[todo] + (rel[todo] * mean_diag[todo])[:, None])
        L, info = torch.linalg.cholesky_ex(sub)
        Hinv = torch.cholesky_inverse(L)
        del L
        factor, info_inv = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
        ok = (info == 0) & (info_inv == 0) & torch.isfinite(factor.diagonal(dim1=-2, dim2=-1)).all(-1)
        if U is None:
            U = factor
        else:
            U[todo[ok]] = factor[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return U, rel
        rel[todo] = torch.where(rel[todo] > 0, rel[todo] * 10, torch.full_like(rel[todo], _DAMP_WHEN_ZERO))
    raise ValueError(f"the Hessians of experts {todo.tolist()} are not positive definite even with relative "
                     f"damping {rel[todo].tolist()}; they are not covariance matrices of real activations")
