import pytest
import torch

from moeq.quant_format import QuantFormat, QuantizedTensor, rtn

FORMATS = [QuantFormat(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32) for s in (True, False)]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_round_trip_is_exact_on_representable_values(fmt):
    # W built from arbitrary stored values quantizes back to exactly those integers.
    g = torch.Generator().manual_seed(0)
    E, N, K = 2, 5, 64
    G = fmt.num_groups(K)
    q = torch.randint(0, fmt.maxq + 1, (E, N, K), generator=g).to(torch.uint8)
    scales = (torch.rand(E, N, G, generator=g) * 0.1 + 1e-3).half()
    zeros = torch.randint(0, fmt.maxq + 1, (E, N, G), generator=g).to(torch.uint8)
    w = fmt.dequantize(q, scales, zeros)
    assert w.dtype == torch.float32
    assert torch.equal(fmt.quantize(w, scales, zeros), q)
    assert torch.equal(QuantizedTensor(q, scales, zeros, fmt).dequantize(), w)


def test_dequantize_matches_the_convention_elementwise():
    fmt = QuantFormat(4, 32, sym=False)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (3, 96), generator=g).to(torch.uint8)
    scales = torch.rand(3, 3, generator=g).half() + 0.01
    zeros = torch.randint(0, 16, (3, 3), generator=g).to(torch.uint8)
    w = fmt.dequantize(q, scales, zeros)
    n, k = 2, 70
    expected = (float(q[n, k]) - float(zeros[n, k // 32])) * float(scales[n, k // 32])
    assert w[n, k].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_rtn_fit_properties(fmt):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 7, 64, generator=g) * 0.05
    qt = rtn(w, fmt)
    G = fmt.num_groups(64)
    assert qt.q.dtype == torch.uint8 and qt.scales.dtype == torch.float16 and qt.zeros.dtype == torch.uint8
    assert qt.q.shape == (3, 7, 64) and qt.scales.shape == (3, 7, G) and qt.zeros.shape == (3, 7, G)
    assert int(qt.q.max()) <= fmt.maxq and int(qt.zeros.max()) <= fmt.maxq
    assert bool((qt.scales > 0).all()) and bool(torch.isfinite(qt.scales).all())
    if fmt.sym:
        assert bool((qt.zeros == 2 ** (fmt.bits - 1)).all())
    # no clipping at p = 1: every weight is within half a step of its dequantized value
    step = qt.scales.float().repeat_interleave(64 // G, dim=-1)
    assert bool(((qt.dequantize() - w).abs() <= 0.5 * step * (1 + 1e-4)).all())


def test_fit_group_returns_exactly_the_stored_values():
    fmt = QuantFormat(3, 32, sym=False)
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(3)) * 0.37
    scales, zeros = fmt.fit(w)
    s, z = fmt.fit_group(w.reshape(4, 4, 32))
    assert torch.equal(s, scales.float()) and torch.equal(z, zeros.float())
    assert torch.equal(s.half().float(), s)  # already float16-representable


@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_group_gets_a_positive_scale_and_dequantizes_to_zero(sym):
    fmt = QuantFormat(4, 32, sym)
    w = torch.randn(2, 64)
    w[1, :32] = 0
    qt = rtn(w, fmt)
    assert float(qt.scales[1, 0]) > 0 and bool(torch.isfinite(qt.scales).all())
    assert bool((qt.dequantize()[1, :32] == 0).all())
    tiny = rtn(torch.full((1, 32), 1e-12), fmt)  # below float16's range: a tiny positive scale, not 0
    assert float(tiny.scales[0, 0]) > 0


def test_clip_search_never_worse_and_helps_with_outliers():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g)
    w[:, ::37] *= 6  # a few outliers per group make the full min/max range wasteful
    plain, clipped = QuantFormat(3, 32, False), QuantFormat(3, 32, False, clip_search=True)
    err = lambda f: (rtn(w, f).dequantize() - w).pow(2).reshape(64, 4, 32).sum(-1)  # noqa: E731
    e_plain, e_clip = err(plain), err(clipped)
    assert bool((e_clip <= e_plain * (1 + 1e-6)).all())
    assert float(e_clip.sum()) < 0.97 * float(e_plain.sum())


def test_validation_messages():
    with pytest.raises(ValueError, match=r"group_size=96 does not divide K=256 .*-1"):
        QuantFormat(4, 96).num_groups(256)
    with pytest.raises(ValueError, match=r"group_size=96 does not divide K=256"):
        rtn(torch.zeros(4, 256), QuantFormat(4, 96))
    with pytest.raises(ValueError, match=r"bits=5 is not supported; allowed: 2, 3, 4, 8"):
        QuantFormat(5)
    with pytest.raises(ValueError, match=r"group_size=0 is not allowed"):
        QuantFormat(4, 0)
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 2\)"):
        QuantizedTensor(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1).half(),
                        torch.zeros(4, 1, dtype=torch.uint8), QuantFormat(4, 32))
    assert QuantFormat(4, -1).num_groups(100) == 1 and QuantFormat(4, 32).num_groups(96) == 3
