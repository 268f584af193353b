import pytest
import torch

from moeq.errors import MoeqError
from moeq.hessian import RoutedHessian, Scratch

E, K = 4, 16


def _routing(T, top_k=2, seed=0, skip_expert=3):
    """Top-k routing pairs over E experts that never pick `skip_expert`: (tokens, experts, gates) [P]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    logits[:, skip_expert] = -1e9
    gates, experts = logits.softmax(-1).topk(top_k, dim=-1)
    tokens = torch.arange(T).repeat_interleave(top_k)
    return tokens, experts.reshape(-1), gates.reshape(-1)


def _naive(batches):
    """Per-pair Python reference in float64: (H_sum [E, K, K], counts [E], weight_sums [E])."""
    h, ws = torch.zeros(E, K, K, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    n = torch.zeros(E, dtype=torch.long)
    for x, tokens, experts, gates in batches:
        for p in range(tokens.numel()):
            t, e = int(tokens[p]), int(experts[p])
            w = 1.0 if gates is None else float(gates[p])
            v = x[t].double()
            h[e] += w * torch.outer(v, v)
            n[e] += 1
            ws[e] += w
    return h, n, ws


@pytest.mark.parametrize("weighted", [False, True])
def test_routed_accumulation_matches_per_token_reference(weighted):
    batches = []
    for seed, T in ((0, 40), (1, 25)):
        x = torch.randn(T, K, generator=torch.Generator().manual_seed(10 + seed)).to(torch.bfloat16)
        tokens, experts, gates = _routing(T, seed=seed)
        batches.append((x, tokens, experts, gates if weighted else None))
    acc = RoutedHessian(E, K)
    for x, tokens, experts, gates in batches:
        acc.add(x, tokens, experts, gates)
    h, n, ws = _naive(batches)
    assert acc.H_sum.dtype == torch.float32
    torch.testing.assert_close(acc.H_sum.double(), h, rtol=1e-5, atol=1e-5)
    assert acc.counts.tolist() == n.tolist() and n[3] == 0 and int(n.sum()) == 2 * 65
    torch.testing.assert_close(acc.weight_sums, ws, rtol=1e-6, atol=0)
    H, report = acc.finalize()
    for e in range(3):  # well-fed experts: the (weighted) mean
        torch.testing.assert_close(H[e].double(), h[e] / ws[e], rtol=1e-5, atol=1e-6)
        assert (report[e].expert, report[e].tokens, report[e].policy) == (e, int(n[e]), None)


def test_dense_linear_is_one_expert_with_every_token():
    x = torch.randn(2, 30, K)  # [B, L, K] is flattened
    acc = RoutedHessian(1, K)
    acc.add(x, torch.arange(60), torch.zeros(60, dtype=torch.long))
    H, report = acc.finalize(min_tokens=0)
    flat = x.reshape(60, K).double()
    torch.testing.assert_close(H[0].double(), flat.T @ flat / 60, rtol=1e-5, atol=1e-6)
    assert report[0].tokens == 60 and report[0].policy is None


def _fed_and_starved():
    """Expert 0: 50 tokens, expert 1: 10 tokens, expert 2: 5 tokens, expert 3: none."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(65, K, generator=g)
    experts = torch.tensor([0] * 50 + [1] * 10 + [2] * 5)
    acc = RoutedHessian(E, K)
    acc.add(x, torch.arange(65), experts)
    per_expert = [x[experts == e].double() for e in range(E)]
    means = [xe.T @ xe / max(len(xe), 1) for xe in per_expert]
    layer = x.double().T @ x.double() / 65
    return acc, means, layer


def test_shrink_policy_formula_and_zero_token_expert():
    acc, means, layer = _fed_and_starved()
    before = acc.H_sum.clone()
    H, report = acc.finalize(min_tokens=20, policy="shrink")
    assert torch.equal(acc.H_sum, before)  # finalize leaves the accumulator alone
    torch.testing.assert_close(H[0].double(), means[0], rtol=1e-5, atol=1e-6)
    for e, n in ((1, 10), (2, 5)):
        torch.testing.assert_close(H[e].double(), (n * means[e] + (20 - n) * layer) / 20, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(H[3].double(), layer, rtol=1e-5, atol=1e-6)  # zero tokens: exactly H_layer
    assert bool(torch.isfinite(H).all())
    assert [(r.tokens, r.policy) for r in report] == [(50, None), (10, "shrink"), (5, "shrink"), (0, "shrink")]


def test_zero_token_expert_is_starved_even_with_min_tokens_zero():
    acc, _, layer = _fed_and_starved()
    H, report = acc.finalize(min_tokens=0)
    torch.testing.assert_close(H[3].double(), layer, rtol=1e-5, atol=1e-6)
    assert [r.policy for r in report] == [None, None, None, "shrink"]


def test_rtn_policy_marks_starved_experts_and_gives_them_the_layer_mean():
    acc, means, layer = _fed_and_starved()
    H, report = acc.finalize(min_tokens=8, policy="rtn")
    assert [r.policy for r in report] == [None, None, "rtn", "rtn"]
    torch.testing.assert_close(H[1].double(), means[1], rtol=1e-5, atol=1e-6)
    for e in (2, 3):
        torch.testing.assert_close(H[e].double(), layer, rtol=1e-5, atol=1e-6)


def test_errors():
    acc = RoutedHessian(E, K)
    with pytest.raises(MoeqError, match="no calibration tokens reached any of the 4 experts"):
        acc.finalize()
    with pytest.raises(ValueError, match=r"expert_idx must be in \[0, 4\)"):
        acc.add(torch.randn(3, K), torch.arange(3), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="unknown; allowed: shrink, rtn"):
        acc.finalize(policy="skip")
    with pytest.raises(ValueError, match="made for K=16"):
        acc.add(torch.randn(3, 8), torch.arange(3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("k", [1, 7, 16, 300])
def test_gram_update_is_the_full_product_and_exactly_symmetric(k):
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(3))
    acc = RoutedHessian(1, k)
    acc.add_grouped(x[:100], torch.tensor([100]))
    acc.add_grouped(x[100:], torch.tensor([200]))
    torch.testing.assert_close(acc.H_sum[0].double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.H_sum[0], acc.H_sum[0].T)


def test_scratch_reuses_its_buffer_and_grows_when_needed():
    scratch = Scratch()
    a = scratch.take((4, 8), torch.float32, "cpu")
    b = scratch.take((2, 8), torch.float32, "cpu")
    assert a.shape == (4, 8) and b.shape == (2, 8) and b.data_ptr() == a.data_ptr()
    c = scratch.take((5, 8), torch.float32, "cpu")
    assert c.shape == (5, 8) and c.numel() == 40
    assert scratch.take((3, 3), torch.float64, "cpu").dtype == torch.float64


def test_gate_weighted_batches_do_not_share_state():
    # the weighted copy lives in a reused buffer: a second batch must not see the first one's rows
    x1, x2 = torch.randn(6, K), torch.randn(9, K)
    w1, w2 = torch.rand(6), torch.rand(9)
    acc = RoutedHessian(1, K)
    acc.add_grouped(x1, torch.tensor([6]), w1)
    acc.add_grouped(x2, torch.tensor([9]), w2)
    x, w = torch.cat([x1, x2]).double(), torch.cat([w1, w2]).double()
    torch.testing.assert_close(acc.H_sum[0].double(), (x * w[:, None]).T @ x, rtol=1e-5, atol=1e-5)
