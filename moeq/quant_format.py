"""Integer weight formats: how to fit scales and zero points, quantize and dequantize.

Convention shared with the checkpoint writer and the kernels, for a weight W [..., N, K]
(N output features, K input features) and G = K // group_size groups (G = 1 per channel):

    q       uint8   [..., N, K]  in [0, 2**bits - 1], original column order
    scales  float16 [..., N, G]  > 0 and finite
    zeros   uint8   [..., N, G]  in [0, 2**bits - 1]; symmetric formats store 2**(bits - 1)
    W[..., n, k] = (q[..., n, k] - zeros[..., n, k // group_size]) * scales[..., n, k // group_size]

Groups are always contiguous in the original column order. Scales are rounded to float16 inside the
fit, so whoever feeds back rounding error (GPTQ) uses exactly the values that will be stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)

# Smallest positive float16 (a subnormal): an all-zero group gets this scale, never 0 or NaN.
# A normal-range floor (6e-5) would force coarse steps on small-magnitude groups at 8 bits.
_MIN_SCALE = 2.0 ** -24
_MAX_SCALE = 65504.0  # largest finite float16

# Clipping search (GPTQ's `mse` option): shrink the min/max range by p in [0.75, 1.0], 20 steps.
_CLIP_MIN_SHRINK = 0.75
_CLIP_STEPS = 20


@dataclass(frozen=True)
class QuantFormat:
    """An integer format: bits, group size (-1: one group per output channel), symmetry, clip search."""

    bits: int
    group_size: int = 128
    sym: bool = True
    clip_search: bool = False  # per (row, group) MSE search over a shrink factor of the range

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; allowed: {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise ValueError(f"group_size={self.group_size!r} is not allowed; use -1 (one group per output "
                             f"channel) or a positive divisor of the input features K")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def group_width(self, k: int) -> int:
        """Columns per group for a weight with K = k input features."""
        self.num_groups(k)
        return k if self.group_size == -1 else self.group_size

    def num_groups(self, k: int) -> int:
        """G for a weight with K = k input features; ValueError when group_size does not divide K."""
        if self.group_size == -1:
            return 1
        if k % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide K={k} input features; use -1 "
                             f"(per channel) or a divisor of {k}")
        return k // self.group_size

    # ---- fitting -----------------------------------------------------------------------------------

    def fit_group(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), float32 [...], for groups spanning the LAST dim of w [..., width].

        The scale is already rounded to float16 and the zero is an integer, so these are exactly the
        stored values; GPTQ calls this on error-updated columns.
        """
        w = w.float()
        xmin = w.amin(-1).clamp_max(0)  # the range always contains 0, so the zero point is in [0, maxq]
        xmax = w.amax(-1).clamp_min(0)
        if self.sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = -xmax
        scale, zero = self._params(xmin, xmax)
        if not self.clip_search:
            return scale, zero
        best = self._sq_error(w, scale, zero)
        for step in range(1, _CLIP_STEPS + 1):
            p = 1.0 - (1.0 - _CLIP_MIN_SHRINK) * step / _CLIP_STEPS
            s, z = self._params(p * xmin, p * xmax)
            err = self._sq_error(w, s, z)
            better = err < best  # strict: ties keep the wider range
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        return scale, zero

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scales float16 [..., N, G] and zeros uint8 [..., N, G] for w [..., N, K], over all groups."""
        *lead, k = w.shape
        groups = self.num_groups(k)
        scale, zero = self.fit_group(w.reshape(*lead, groups, k // groups))
        return scale.to(torch.float16), zero.to(torch.uint8)

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = _half_up(((xmax - xmin) / self.maxq).clamp(_MIN_SCALE, _MAX_SCALE))
        if self.sym:
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:  # zero from the stored (float16) scale, so dequantization hits the intended grid
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return scale, zero

    def _sq_error(self, w, scale, zero) -> torch.Tensor:
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        return self.decode(self.encode(w, s, z), s, z, inplace=True).sub_(w).square_().sum(-1)

    # ---- element-wise rule (broadcasting float tensors) ----------------------------------------------

    def encode(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer levels as float32: clamp(round(w / scale) + zero, 0, maxq). One new tensor: the clip
        search calls this on whole weights 21 times, and each fresh tensor of that size is page-faulted in."""
        return torch.div(w, scale).round_().add_(zero).clamp_(0, self.maxq)

    @staticmethod
    def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """(q - zero) * scale; in q's memory when `inplace` (the caller hands q over)."""
        return (q.sub_(zero) if inplace else q - zero).mul_(scale)

    # ---- whole tensors in the stored convention ---------------------------------------------------------

    def quantize(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """q uint8 [..., N, K] for w [..., N, K] with scales/zeros [..., N, G]."""
        s, z = _per_column(scales, w.shape[-1]), _per_column(zeros, w.shape[-1])
        return self.encode(w.float(), s, z).to(torch.uint8)

    def dequantize(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """float32 [..., N, K] = (q - zero) * scale, group by group."""
        s, z = _per_column(scales, q.shape[-1]), _per_column(zeros, q.shape[-1])
        return self.decode(q.float(), s, z)


def _half_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= x (x > 0 and finite), as float32.

    Rounding the scale up, never down, keeps the whole fitted range representable: with round-to-nearest
    a float16 scale may shrink by 2**-11, which at 8 bits clips the extreme weight by 1/8 of a step.
    """
    h = x.half()
    up = (h.view(torch.int16) + 1).view(torch.float16)  # next float16 up (positive values only)
    return torch.where(h.float() < x, up, h).float()


def _per_column(params: torch.Tensor, k: int) -> torch.Tensor:
    """[..., N, G] -> float32 [..., N, K] with column k taking group k // (K // G)."""
    return params.float().repeat_interleave(k // params.shape[-1], dim=-1)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight in the stored convention (see the module docstring) and its format."""

    q: torch.Tensor       # uint8 [..., N, K]
    scales: torch.Tensor  # float16 [..., N, G]
    zeros: torch.Tensor   # uint8 [..., N, G]
    fmt: QuantFormat

    def __post_init__(self):
        k = self.q.shape[-1]
        shape = (*self.q.shape[:-1], self.fmt.num_groups(k))
        for name, t, dtype in (("q", self.q, torch.uint8), ("scales", self.scales, torch.float16),
                               ("zeros", self.zeros, torch.uint8)):
            if t.dtype != dtype:
                raise ValueError(f"QuantizedTensor.{name} must be {dtype}, got {t.dtype}")
        for name, t in (("scales", self.scales), ("zeros", self.zeros)):
            if tuple(t.shape) != shape:
                raise ValueError(f"QuantizedTensor.{name} must have shape {shape} for q {tuple(self.q.shape)} "
                                 f"and group_size={self.fmt.group_size}, got {tuple(t.shape)}")

    def dequantize(self) -> torch.Tensor:
        """float32 [..., N, K]."""
        return self.fmt.dequantize(self.q, self.scales, self.zeros)

    def expert(self, i: int) -> QuantizedTensor:
        """Weight i of a stack [E, N, K] (the experts of a batched solve), as [N, K]."""
        return QuantizedTensor(self.q[i], self.scales[i], self.zeros[i], self.fmt)


def rtn(w: torch.Tensor, fmt: QuantFormat) -> QuantizedTensor:
    """Round-to-nearest: fit every group of w [..., N, K] on the weights themselves and round."""
    w = w.float()
    scales, zeros = fmt.fit(w)
    return QuantizedTensor(fmt.quantize(w, scales, zeros), scales, zeros, fmt)
