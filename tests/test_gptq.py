import math

import pytest
import torch

from moeq.gptq import gptq_quantize
from moeq.quant_format import QuantFormat, rtn


def _hessian(K, T, gen, spread=4.0):
    """Mean Hessian X^T X / T of correlated inputs: mixed features with unequal scales (not identity)."""
    mix = torch.randn(K, K, generator=gen) / K ** 0.5 + 0.3 * torch.eye(K)
    scale = torch.exp(torch.rand(K, generator=gen) * math.log(spread))
    x = (torch.randn(T, K, generator=gen) @ mix) * scale
    return x.T @ x / T


def _problem(E, N, K, T=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    H = torch.stack([_hessian(K, T or 4 * K, gen) for _ in range(E)])
    W = torch.randn(E, N, K, generator=gen) * 0.05
    return W, H


def _loss(w, dq, H):
    """tr(dW H dW^T) / N per expert, float64."""
    d = (dq - w).double()
    return torch.einsum("enk,ekj,enj->e", d, H.double(), d) / w.shape[1]


def _reference_gptq(w, h, fmt, act_order, damp):
    """Textbook GPTQ on one expert in float64: column by column with explicit inverse-Hessian downdates
    (no Cholesky, no blocks). Same dead-column, damping and static-group rules as moeq.gptq."""
    w, h = w.double().clone(), h.double().clone()
    K = w.shape[1]
    gs = fmt.group_width(K)
    dead = h.diagonal() == 0
    mean = h.diagonal()[~dead].mean()
    h[dead, :], h[:, dead] = 0, 0
    h[dead, dead] = 1
    h += damp * mean * torch.eye(K, dtype=torch.float64)
    perm = torch.argsort(h.diagonal() * ~dead, descending=True, stable=True) if act_order else torch.arange(K)
    static = act_order or gs == K
    scales, zeros = (t.double() for t in fmt.fit(w.float()))
    hinv = torch.linalg.inv(h[perm][:, perm])
    wp, q = w[:, perm], torch.zeros_like(w)
    for i in range(K):
        col = int(perm[i])
        if static:
            s, z = scales[:, col // gs], zeros[:, col // gs]
        elif i % gs == 0:
            s, z = (t.double() for t in fmt.fit_group(wp[:, i:i + gs].float()))
            scales[:, col // gs], zeros[:, col // gs] = s, z
        qi = fmt.encode(wp[:, i], s, z)
        err = (wp[:, i] - fmt.decode(qi, s, z)) / hinv[i, i]
        wp[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
        q[:, col] = qi
    return q, scales


@pytest.mark.parametrize("fmt", [QuantFormat(4, 32, False), QuantFormat(3, -1, True), QuantFormat(2, 32, True),
                                 QuantFormat(8, 64, False)], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_textbook_reference(fmt, act_order):
    W, H = _problem(1, 24, 128, seed=1)
    res = gptq_quantize(W, H, fmt, act_order=act_order, damp=0.1, block_size=32)
    q_ref, scales_ref = _reference_gptq(W[0], H[0], fmt, act_order, damp=0.1)
    # float32 blocked Cholesky vs float64 downdates: a rare rounding tie may flip one level
    assert (res.q[0].double() == q_ref).double().mean() >= 0.99
    assert (res.scales[0].double() == scales_ref).double().mean() >= 0.99
    dq_ref = fmt.dequantize(q_ref.to(torch.uint8), scales_ref.half(), res.zeros[0])
    torch.testing.assert_close(res.loss.double(), _loss(W, dq_ref[None], H), rtol=1e-3, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_solve_matches_per_expert_solves(act_order):
    # expert 1 sees fewer tokens than K (singular H): its damping is raised, the others' is not
    gen = torch.Generator().manual_seed(2)
    K = 64
    H = torch.stack([_hessian(K, 512, gen), _hessian(K, 16, gen), _hessian(K, 512, gen)])
    W = torch.randn(3, 20, K, generator=gen)
    fmt = QuantFormat(4, 32, sym=False)
    batched = gptq_quantize(W, H, fmt, act_order=act_order, damp=1e-9)
    assert batched.damp[0] == batched.damp[2] == torch.tensor(1e-9) and batched.damp[1] > 1e-9
    for e in range(3):
        single = gptq_quantize(W[e], H[e], fmt, act_order=act_order, damp=1e-9)
        # tolerance: integers and scales exactly equal; float diagnostics to 1e-6 relative
        assert torch.equal(single.q, batched.q[e])
        assert torch.equal(single.scales, batched.scales[e]) and torch.equal(single.zeros, batched.zeros[e])
        for name in ("loss", "rel_loss", "damp"):
            torch.testing.assert_close(getattr(single, name), getattr(batched, name)[e], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_loss_strictly_below_rtn(bits, group_size, sym, act_order):
    W, H = _problem(2, 16, 256, seed=bits * 100 + group_size)
    fmt = QuantFormat(bits, group_size, sym)
    res = gptq_quantize(W, H, fmt, act_order=act_order)
    rtn_loss = _loss(W, rtn(W, fmt).dequantize(), H)
    assert bool((res.loss.double() < 0.95 * rtn_loss).all()), (res.loss, rtn_loss)
    assert bool((res.rel_loss > 0).all()) and bool((res.rel_loss < 1).all())


@pytest.mark.parametrize("act_order", [False, True])
def test_clip_search_loss_below_rtn(act_order):
    W, H = _problem(2, 16, 128, seed=7)
    fmt = QuantFormat(3, 32, sym=False, clip_search=True)
    res = gptq_quantize(W, H, fmt, act_order=act_order)
    assert bool((res.loss.double() < _loss(W, rtn(W, fmt).dequantize(), H)).all())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", [QuantFormat(4, 32, False), QuantFormat(4, -1, True)], ids=str)
def test_result_dequantizes_consistently_in_original_order(fmt, act_order):
    W, H = _problem(2, 12, 128, seed=3)
    res = gptq_quantize(W, H, fmt, act_order=act_order)
    dq = res.quantized.dequantize()
    # the loss the solve reports is the loss of the stored q / scales / zeros, in original column order
    torch.testing.assert_close(res.loss.double(), _loss(W, dq, H), rtol=1e-4, atol=0)
    energy = torch.einsum("enk,ekj,enj->e", W.double(), H.double(), W.double()) / W.shape[1]
    torch.testing.assert_close(res.rel_loss.double(), res.loss.double() / energy, rtol=1e-4, atol=0)
    if act_order or fmt.group_size == -1:  # static groups: fitted on the original weight's own groups
        scales, zeros = fmt.fit(W)
        assert torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)


def test_singular_hessian_raises_damping_and_reports_it():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 64, generator=gen)  # 10 tokens, K = 64: rank 10
    H = (x.T @ x / 10)[None]
    W = torch.randn(1, 8, 64, generator=gen)
    res = gptq_quantize(W, H, QuantFormat(4, 32), damp=1e-9)
    steps = math.log10(float(res.damp[0]) / 1e-9)
    assert steps >= 1 and abs(steps - round(steps)) < 1e-3  # raised by whole factors of 10
    assert bool(torch.isfinite(res.loss).all())
    zero = gptq_quantize(W, H, QuantFormat(4, 32), damp=0.0)  # damp=0 restarts from 1e-6
    assert float(zero.damp[0]) >= 0.99e-6 and bool(torch.isfinite(zero.loss).all())


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_rounded_not_zeroed(act_order):
    W, H = _problem(2, 16, 64, seed=5)
    dead = torch.tensor([3, 17, 40, 41])
    H[0, dead, :] = 0  # expert 0 never saw these input features
    H[0, :, dead] = 0
    fmt = QuantFormat(4, 32, False)
    res = gptq_quantize(W, H, fmt, act_order=act_order)
    assert res.dead_columns.tolist() == [4, 0]
    dq = res.quantized.dequantize()[0][:, dead]
    # no error propagates into a dead column: it is exactly round-to-nearest with its group's scale
    s = res.scales[0].float()[:, dead // 32]
    z = res.zeros[0].float()[:, dead // 32]
    assert torch.equal(res.q[0][:, dead].float(), fmt.encode(W[0][:, dead], s, z))
    assert bool(((dq - W[0][:, dead]).abs() <= 0.5 * s * (1 + 1e-4)).all())
    assert float((dq != 0).double().mean()) > 0.75  # only weights within half a step of 0 round to 0
    assert bool((res.loss < _loss(W, rtn(W, fmt).dequantize(), H).float()).all())


def test_odd_shapes_and_two_dimensional_input():
    W, H = _problem(1, 1, 32, seed=6)  # N = 1, K = group_size
    res = gptq_quantize(W[0], H[0], QuantFormat(4, 32), act_order=True)
    assert res.q.shape == (1, 32) and res.scales.shape == (1, 1) and res.zeros.shape == (1, 1)
    assert res.loss.shape == () and res.damp.shape == () and res.dead_columns.shape == ()
    W, H = _problem(2, 5, 96, seed=7)  # K not a multiple of the block size
    res = gptq_quantize(W, H, QuantFormat(3, 32, False), block_size=64)
    assert res.q.shape == (2, 5, 96) and res.scales.shape == (2, 5, 3)
    assert bool((res.loss.double() < _loss(W, rtn(W, QuantFormat(3, 32, False)).dequantize(), H)).all())


@pytest.mark.parametrize("act_order", [False, True])
def test_block_size_only_changes_rounding(act_order):
    W, H = _problem(2, 16, 128, seed=8)
    fmt = QuantFormat(4, 64, False)
    small = gptq_quantize(W, H, fmt, act_order=act_order, block_size=16)  # blocks widen to whole groups
    large = gptq_quantize(W, H, fmt, act_order=act_order, block_size=128)
    assert (small.q == large.q).double().mean() >= 0.99
    torch.testing.assert_close(small.loss, large.loss, rtol=1e-3, atol=0)


def test_inputs_untouched_and_low_precision_weights():
    W, H = _problem(2, 8, 64, seed=9)
    W = W.to(torch.bfloat16)
    H[1, 5, :], H[1, :, 5] = 0, 0
    W0, H0 = W.clone(), H.clone()
    res = gptq_quantize(W, H, QuantFormat(4, 32), act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert res.q.dtype == torch.uint8 and res.scales.dtype == torch.float16 and res.loss.dtype == torch.float32


def test_zero_weights_give_zero_loss_not_nan():
    _, H = _problem(1, 4, 64, seed=10)
    res = gptq_quantize(torch.zeros(1, 4, 64), H, QuantFormat(4, 32, False))
    assert res.loss.tolist() == [0.0] and res.rel_loss.tolist() == [0.0]
    assert bool((res.scales > 0).all())


def test_shape_errors():
    with pytest.raises(ValueError, match=r"expected W \[E, N, K\] and H \[E, K, K\]"):
        gptq_quantize(torch.zeros(2, 4, 64), torch.eye(64)[None], QuantFormat(4, 32))
    with pytest.raises(ValueError, match="group_size=48 does not divide K=64"):
        gptq_quantize(torch.zeros(4, 64), torch.eye(64), QuantFormat(4, 48))


@pytest.mark.parametrize("act_order", [False, True])
def test_weights_sharing_a_hessian_solve_as_one_stacked_along_rows(act_order):
    # q/k/v (one input) or an expert's gate and up share H: the pipeline solves them stacked along N
    W, H = _problem(3, 40, 128, seed=5)
    fmt = QuantFormat(4, 32, True, clip_search=True)
    joint = gptq_quantize(W, H, fmt, act_order=act_order)
    for rows in (slice(0, 16), slice(16, 40)):
        alone, part = gptq_quantize(W[:, rows], H, fmt, act_order=act_order), joint.rows(rows)
        # the same arithmetic per row; BLAS may block the shared updates differently for another N
        assert (part.q == alone.q).double().mean() >= 0.999
        assert (part.scales == alone.scales).double().mean() >= 0.999
        torch.testing.assert_close(part.loss, alone.loss, rtol=1e-4, atol=0)
        torch.testing.assert_close(part.rel_loss, alone.rel_loss, rtol=1e-4, atol=0)
        assert torch.equal(part.damp, alone.damp)
