"""Triton kernels for quantized grouped-expert (MoE) and dense matmuls, each with a torch twin."""
