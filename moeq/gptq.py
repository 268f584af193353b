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

from dataclasses import dataclass, replace

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
    row_error: torch.Tensor     # [E, N] squared output error of each row, dw H dw^T, with the undamped H
    row_energy: torch.Tensor    # [E, N] output energy of each row, w H w^T
    damp: torch.Tensor          # [E] relative damping actually used
    dead_columns: torch.Tensor  # [E] int64, input columns with diag(H) == 0
    fmt: QuantFormat

    @property
    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.q, self.scales, self.zeros, self.fmt)

    @property
    def loss(self) -> torch.Tensor:
        """[E] tr(dW H dW^T) / N: the mean squared output error."""
        return losses(self.row_error, self.row_energy)[0]

    @property
    def rel_loss(self) -> torch.Tensor:
        """[E] tr(dW H dW^T) / tr(W H W^T)."""
        return losses(self.row_error, self.row_energy)[1]

    def rows(self, rows: slice) -> GPTQResult:
        """The result for a slice of the output rows: rows are solved independently given H, so solving
        weights that share H stacked along N and slicing equals solving each alone."""
        return replace(self, q=self.q[..., rows, :], scales=self.scales[..., rows, :],
                       zeros=self.zeros[..., rows, :], row_error=self.row_error[..., rows],
                       row_energy=self.row_energy[..., rows])


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
    bad = ~torch.isfinite(H.sum((1, 2)))  # a sum, not an elementwise mask: no [E, K, K] temporary
    if bad.any():
        raise ValueError(f"H of experts {bad.nonzero().flatten().tolist()} contains NaN or Inf")
    w_orig = W.float()

    # --- Hessian preparation: order, dead columns, damping, factor -------------------------------------
    diag = H.diagonal(dim1=-2, dim2=-1)                                      # [E, K]
    dead = diag == 0
    live = (~dead).sum(-1)
    mean_diag = torch.where(live > 0, diag.sum(-1) / live.clamp_min(1), torch.ones_like(diag[:, 0]))
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)      # [E, K]
    else:
        perm = torch.arange(K, device=dev).expand(E, K)
    U, rel_damp = _inverse_hessian_factor(H, perm if act_order else None, dead, mean_diag, damp)

    # --- scales for static groups (per channel, or act_order): fitted on the original weight -----------
    refit = gs < K and not act_order  # group-wise: fit each group on its error-updated columns
    if refit:
        scales = torch.empty(E, N, G, dtype=torch.float32, device=dev)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = (t.float() for t in fmt.fit(w_orig))
    col_group = perm // gs                                                     # [E, K] group of each solve column

    # --- the solve, in permuted order, lazy blocks aligned to whole groups ------------------------------
    # Column-major working copy: row k of Wt is solve column k, so every per-column op and the rank-1
    # updates touch contiguous memory.
    Wt = w_orig.transpose(1, 2).gather(1, perm[:, :, None].expand(E, K, N))   # [E, K, N]
    Qt = torch.empty(E, K, N, dtype=torch.uint8, device=dev)
    B = block_size if gs >= K else max(1, block_size // gs) * gs
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = Wt[:, i1:i2]                                                     # [E, b, N], updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]                                               # [E, b, b]
        d1 = U1.diagonal(dim1=-2, dim2=-1)                                    # [E, b]
        if refit:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
        else:
            idx = col_group[:, i1:i2, None].expand(E, i2 - i1, N)
            S1, Z1 = scales.transpose(1, 2).gather(1, idx), zeros.transpose(1, 2).gather(1, idx)
        for i in range(i2 - i1):
            if refit and i % gs == 0:
                s, z = fmt.fit_group(W1[:, i:i + gs].transpose(1, 2))         # [E, N]
                g = (i1 + i) // gs
                scales[:, :, g], zeros[:, :, g] = s, z
                S1[:, i:i + gs], Z1[:, i:i + gs] = s[:, None, :], z[:, None, :]
            w, s, z = W1[:, i], S1[:, i], Z1[:, i]                            # [E, N]
            q = fmt.encode(w, s, z)
            err = (w - fmt.decode(q, s, z)) / d1[:, i, None]
            Qt[:, i1 + i] = q
            Err1[:, i] = err
            W1[:, i + 1:].addcmul_(U1[:, i, i + 1:, None], err[:, None, :], value=-1.0)
        if i2 < K:
            Wt[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1.0)

    # --- back to original column order, and the loss with the undamped Hessian ---------------------------
    if act_order:
        Qt = Qt.gather(1, torch.argsort(perm, dim=-1)[:, :, None].expand(E, K, N))
    Q = Qt.transpose(1, 2).contiguous()                                      # [E, N, K]
    del Qt, Wt
    scales16, zeros8 = scales.to(torch.float16), zeros.to(torch.uint8)
    row_error, row_energy = row_errors(w_orig, fmt.dequantize(Q, scales16, zeros8), H)
    out = dict(q=Q, scales=scales16, zeros=zeros8, row_error=row_error, row_energy=row_energy, damp=rel_damp,
               dead_columns=dead.sum(-1))
    if squeeze:
        out = {k: v[0] for k, v in out.items()}
    return GPTQResult(**out, fmt=fmt)


def row_errors(w: torch.Tensor, dq: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(error, energy) [E, N] per output row of weights w and their quantized dq [E, N, K] under H [E, K, K]:
    the squared output error (dq - w) H (dq - w)^T and the output energy w H w^T of each row."""
    def energy(m):
        return (torch.bmm(m, H) * m).sum(-1)
    return energy(dq - w), energy(w)


def losses(row_error: torch.Tensor, row_energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, rel_loss) over the rows (last dim): loss = tr(dW H dW^T) / N, the mean squared output error
    per output element; rel_loss = tr(dW H dW^T) / tr(W H W^T) (0 where the output has no energy)."""
    loss, base = row_error.sum(-1), row_energy.sum(-1)
    rel_loss = torch.where(base > 0, loss / base.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(loss))
    return loss / row_error.shape[-1], rel_loss


def _inverse_hessian_factor(H, perm, dead, mean_diag, damp: float):
    """(U [E, K, K] upper Cholesky factor of the inverse of the prepared Hessian, relative damping [E]).

    Prepared: columns in solve order `perm` (None: as is), dead columns isolated with diagonal 1, and
    lambda = rel * mean_diag added to the diagonal. Experts whose factorization fails (not numerically
    positive definite: rank-deficient calibration, too few tokens) are retried alone with rel x 10.
    Peak memory is H plus three [E, K, K] copies (prepared H, then L and cholesky_inverse's workspace).
    """
    E = H.shape[0]
    rel = torch.full((E,), float(damp), dtype=torch.float32, device=H.device)
    todo = torch.arange(E, device=H.device)
    U = None
    for _ in range(_DAMP_TRIES):
        subset = None if U is None else todo  # first pass: all experts, no indexing copy
        A = _prepared(H, perm, dead, rel * mean_diag, subset)
        L, info = torch.linalg.cholesky_ex(A)
        del A
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


def _prepared(H, perm, dead, lam, subset):
    """H [E, K, K] (or its `subset` of experts) permuted by perm, dead columns isolated, lam [E] on the diagonal."""
    if subset is not None:
        H, dead, lam = H[subset], dead[subset], lam[subset]
        perm = None if perm is None else perm[subset]
    E, K, _ = H.shape
    if perm is None:
        A = H.clone()
    else:
        A = H.gather(1, perm[:, :, None].expand(E, K, K)).gather(2, perm[:, None, :].expand(E, K, K))
        dead = dead.gather(1, perm)
    # A dead column gets diagonal 1 and no coupling, so no rounding error propagates into or out of it.
    if dead.any():
        A.masked_fill_(dead[:, :, None], 0.0).masked_fill_(dead[:, None, :], 0.0)
        A.diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
    A.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    return A
