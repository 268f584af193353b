"""Triton kernels for quantized grouped-expert (MoE) and dense matmuls, each with a torch twin."""

from .configs import GemmConfig
from .dequant import dequantize_packed
from .fused_moe import fused_moe, fused_moe_torch
from .moe_routing import moe_align_block_size, moe_align_block_size_torch
from .packing import PackedExperts, dequantize, pack_experts, pack_linear, unpack_q
from .quant_linear import quant_linear, quant_linear_torch

__all__ = [
    "GemmConfig", "PackedExperts", "dequantize", "dequantize_packed", "fused_moe", "fused_moe_torch",
    "moe_align_block_size", "moe_align_block_size_torch", "pack_experts", "pack_linear", "quant_linear",
    "quant_linear_torch", "unpack_q",
]
