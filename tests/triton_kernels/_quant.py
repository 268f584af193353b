"""Random quantized weights in moeq's quantizer convention (never zeros), shared by the kernel tests."""

import torch


def random_quantized(E, N, K, bits, group_size, sym, device="cpu", generator=None):
    """q uint8 [E, N, K], scales fp16 [E, N, G], zeros uint8 [E, N, G]; group_size >= K is per-channel."""
    G = -(-K // group_size) if group_size < K else 1
    q = torch.randint(0, 1 << bits, (E, N, K), dtype=torch.uint8, generator=generator)
    # scales ~ 1/sqrt(K) / levels keep the block's activations O(1) at any size
    scales = ((torch.rand(E, N, G, generator=generator) + 0.5) * (2.0 / (1 << bits)) / K**0.5).half()
    if sym:
        zeros = torch.full((E, N, G), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 1 << bits, (E, N, G), dtype=torch.uint8, generator=generator)
    return q.to(device), scales.to(device), zeros.to(device)


def dequant_reference(q, scales, zeros, group_size):
    """fp32 W [E, N, K] straight from the quantizer convention."""
    K = q.shape[-1]
    g = torch.arange(K, device=q.device) // (group_size if scales.shape[-1] > 1 else K)
    return (q.float() - zeros.float()[..., g]) * scales.float()[..., g]


def random_routing(T, E, k, device="cpu", generator=None):
    """topk_ids [T, k] distinct experts per token (uniform), topk_weights [T, k] softmax-normalised."""
    ids = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    weights = torch.softmax(torch.randn(T, k, generator=generator), dim=-1)
    return ids.to(device), weights.to(device)


def rel_error(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()
