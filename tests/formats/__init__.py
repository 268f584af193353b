"""Helpers shared by the format tests: random stored tensors and two mixed-bit module maps."""

import torch

from moeq.formats import Scheme


def random_quantized(bits, group_size, sym, n, k, *, lead=(), seed=0):
    """q/scales/zeros in moeq's convention, with 0 and 2**bits - 1 always among q and (asym) zeros."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    maxq = 2 ** bits - 1
    q = torch.randint(0, maxq + 1, (*lead, n, k), generator=gen).to(torch.uint8)
    q.view(-1)[:2] = torch.tensor([0, maxq])
    scales = (torch.rand(*lead, n, groups, generator=gen) * 0.1 + 0.01).half()
    if sym:
        zeros = torch.full((*lead, n, groups), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, maxq + 1, (*lead, n, groups), generator=gen).to(torch.uint8)
        zeros.view(-1)[:2] = torch.tensor([0, maxq])
    return q, scales, zeros


def mixtral_map(layers=4, experts=8):
    """Experts 4-bit g128, attention 8-bit per channel, routers and the last layer kept, lm_head kept."""
    pm = {}
    for layer in range(layers):
        last = layer == layers - 1
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            pm[f"model.layers.{layer}.self_attn.{p}"] = None if last else Scheme(8, -1, True)
        pm[f"model.layers.{layer}.block_sparse_moe.gate"] = None
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                pm[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"] = None if last else Scheme(4, 128, True)
    pm["lm_head"] = None
    return pm


def qwen_map():
    """Every layer different: asym experts, shared experts, a per-layer attention scheme, quantized lm_head."""
    pm = {}
    experts = [Scheme(4, 128, True), Scheme(3, 32, False), Scheme(2, 64, False)]
    attention = [Scheme(8, -1, True), Scheme(4, 64, False), Scheme(8, -1, True)]
    for layer in range(3):
        pre = f"model.layers.{layer}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            pm[f"{pre}.self_attn.{p}"] = attention[layer]
        pm[f"{pre}.mlp.gate"] = None
        pm[f"{pre}.mlp.shared_expert_gate"] = None
        for p in ("gate_proj", "up_proj", "down_proj"):
            pm[f"{pre}.mlp.shared_expert.{p}"] = Scheme(8, 128, True)
            for e in range(8):
                pm[f"{pre}.mlp.experts.{e}.{p}"] = experts[layer]
    pm["lm_head"] = Scheme(8, 128, True)
    return pm
