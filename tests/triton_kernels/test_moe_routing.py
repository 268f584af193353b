import pytest
import torch

from triton_kernels.moe_routing import max_blocks, moe_align_block_size, moe_align_block_size_torch


def _check_against_twin(ids, E, block_m):
    got = moe_align_block_size(ids, E, block_m)
    ref = moe_align_block_size_torch(ids, E, block_m)
    for name, a, b in zip(got._fields, got, ref):
        assert torch.equal(a.cpu(), b.cpu()), name
    return ref


@pytest.mark.parametrize(
    "T,E,k,block_m",
    [(1, 8, 2, 16), (1, 256, 8, 16), (7, 16, 4, 16), (300, 64, 8, 32), (200, 8, 2, 64), (5, 4, 1, 16),
     (129, 8, 8, 16)],
)
def test_matches_twin(T, E, k, block_m, device):
    g = torch.Generator().manual_seed(T * E + k)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
    _check_against_twin(ids.int(), E, block_m)


def test_layout_with_empty_experts(device):
    # 17 tokens all routed to experts 0 and 2; experts 1, 3, 4 get nothing
    ids = torch.tensor([[0, 2]] * 17, dtype=torch.int64, device=device)
    r = _check_against_twin(ids, 5, 16)
    P = 34
    assert max_blocks(P, 5, 16) == 7 and r.block_expert.numel() == 7
    assert int(r.num_padded) == 64  # 17 -> 32 slots for each of the two experts
    assert r.block_expert.tolist() == [0, 0, 2, 2, -1, -1, -1]
    s = r.sorted_ids.cpu()
    assert s[:17].tolist() == list(range(0, P, 2)) and s[32:49].tolist() == list(range(1, P, 2))
    assert torch.all(s[17:32] == P) and torch.all(s[49:] == P)


def test_single_token_and_out_of_range_ids(device):
    ids = torch.tensor([[3, -1, 9]], dtype=torch.int32, device=device)  # -1 and 9 are dropped (E=8)
    r = _check_against_twin(ids, 8, 16)
    assert int(r.num_padded) == 16 and r.block_expert[0].item() == 3
    assert r.sorted_ids[0].item() == 0 and torch.all(r.sorted_ids[1:] == 3)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="topk_ids"):
        moe_align_block_size(torch.zeros(4, dtype=torch.int32), 8, 16)
    with pytest.raises(ValueError, match="power of two"):
        moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32), 8, 24)
