"""Kernel-backed modules for running a quantized checkpoint on a GPU with moeq's Triton kernels.

`KernelExperts` replaces transformers' fused experts module (same call: hidden [T, H], top_k_index
[T, k], top_k_weights [T, k]); `KernelLinear` replaces an nn.Linear. Both hold their weights repacked
once, at load time, into the kernels' layout. A layer whose experts do not share one 4- or 8-bit scheme
(or whose activation is not SiLU) keeps the dequantized reference modules, and the loader says so.
A per-channel format (group_size -1) goes to the kernels as one group as wide as K (QuantFormat.group_width).
"""

from __future__ import annotations

import torch

from moeq.inventory import TensorInfo
from moeq.quant_format import QuantizedTensor

KERNEL_BITS = (4, 8)


class KernelExperts(torch.nn.Module):
    def __init__(self, w13, w2):
        super().__init__()
        self.w13, self.w2 = w13, w2  # triton_kernels.packing.PackedExperts, built on the target device

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from triton_kernels.fused_moe import fused_moe

        return fused_moe(hidden_states, self.w13, self.w2, top_k_index, top_k_weights)  # cast to fp32 in-kernel


class KernelLinear(torch.nn.Module):
    def __init__(self, packed, bias: torch.Tensor | None):
        super().__init__()
        self.packed = packed
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        from triton_kernels.quant_linear import quant_linear

        return quant_linear(x, self.packed, self.bias)


def _stack(quantized: list[QuantizedTensor], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.stack([getattr(q, part) for q in quantized]).to(device) for part in ("q", "scales", "zeros"))


def kernel_experts(experts: dict[tuple[int, str], QuantizedTensor], num_experts: int, device) -> KernelExperts | None:
    """KernelExperts from {(expert, proj): QuantizedTensor} of one layer, or None when the kernels can't run it."""
    from triton_kernels.packing import pack_experts

    formats = {q.fmt for q in experts.values()}
    if len(experts) != 3 * num_experts or len(formats) != 1 or next(iter(formats)).bits not in KERNEL_BITS:
        return None
    fmt = next(iter(formats))
    gate_up = [QuantizedTensor(*(torch.cat([getattr(experts[(e, "gate")], p), getattr(experts[(e, "up")], p)])
                                 for p in ("q", "scales", "zeros")), fmt) for e in range(num_experts)]
    q13, q2 = _stack(gate_up, device), _stack([experts[(e, "down")] for e in range(num_experts)], device)
    w13 = pack_experts(*q13, fmt.bits, fmt.group_width(q13[0].shape[-1]), gate_up=True)
    w2 = pack_experts(*q2, fmt.bits, fmt.group_width(q2[0].shape[-1]))
    return KernelExperts(w13, w2)


def kernel_linear(quantized: QuantizedTensor, bias: torch.Tensor | None, device) -> KernelLinear | None:
    from triton_kernels.packing import pack_linear

    fmt = quantized.fmt
    if fmt.bits not in KERNEL_BITS:
        return None
    q, scales, zeros = (t.to(device) for t in (quantized.q, quantized.scales, quantized.zeros))
    return KernelLinear(pack_linear(q, scales, zeros, fmt.bits, fmt.group_width(q.shape[-1])), bias)


def swap_in_kernels(layer: torch.nn.Module, layer_tensors: list[TensorInfo], packed_of, slot_of, num_experts: int,
                    device, log=print) -> int:
    """Replace a resident layer's quantized modules by kernel modules; returns how many were replaced."""
    experts = {}
    replaced = 0
    for t in layer_tensors:
        quantized = packed_of(t)
        if quantized is None:
            continue
        if t.role == "expert":
            experts[(t.expert, t.proj)] = quantized
            continue
        path = slot_of(t).module_path()
        linear = layer.get_submodule(path)
        module = kernel_linear(quantized, getattr(linear, "bias", None), device)
        if module is not None:
            parent, name = path.rsplit(".", 1) if "." in path else ("", path)
            setattr(layer.get_submodule(parent) if parent else layer, name, module)
            replaced += 1
    if experts:
        module = kernel_experts(experts, num_experts, device)
        path = slot_of(next(t for t in layer_tensors if t.role == "expert")).module_path()
        if module is None:
            log(f"warning: {path} keeps the dequantized reference path: its experts do not share one 4/8-bit scheme")
        else:
            parent, name = path.rsplit(".", 1)
            setattr(layer.get_submodule(parent), name, module)
            replaced += 1
    return replaced
