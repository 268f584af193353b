import sys
from pathlib import Path

import pytest

from moeq.inventory import inventory_from_checkpoint
from moeq.plan import make_plan
from moeq.quantize import QuantizeConfig, quantize_model
from moeq.recipe import load_recipe
from moeq.trial import (ActivationCache, TrialConfig, TrialError, parse_layers, per_layer, plot_trials, run_trial,
                        sweep_plans, trial_plan, trial_table)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO = EXAMPLES / "demo-mixtral"
SETTING = dict(calib_samples=8, seq_len=128, eval_windows=4, device="cpu")
FAST = ["defaults.clip=false", "defaults.gate_weighted=false"]  # the clip search is what costs here


@pytest.fixture(scope="module")
def plan():
    return make_plan(inventory_from_checkpoint(DEMO), load_recipe("mixtral", FAST))


@pytest.fixture(scope="module")
def cache(plan):
    return ActivationCache(plan.inventory, TrialConfig(calib=EXAMPLES / "calib.txt", eval=EXAMPLES / "eval.txt",
                                                       **SETTING), log=lambda *a: None)


def test_trial_plan_keeps_every_layer_outside_the_subset(plan):
    trial = trial_plan(plan, {1, 2})
    for full, entry in zip(plan.entries, trial.entries):
        inside = entry.tensor.layer in (1, 2)
        assert entry.scheme == (full.scheme if inside else None)
    assert {e.tensor.role for e in trial.entries if e.scheme is not None} == {"attn", "expert"}
    only_experts = trial_plan(plan, None, {"expert"})
    assert {e.tensor.role for e in only_experts.entries if e.scheme is not None} == {"expert"}


def test_sweep_plans(plan):
    assert [name for name, _ in sweep_plans(plan, "layers")] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert [name for name, _ in sweep_plans(plan, "role")] == ["role attn", "role expert"]
    assert [name for name, _ in sweep_plans(plan, "layers", {0, 3})] == ["layer 0", "layer 3"]
    with pytest.raises(TrialError, match="use layers or role"):
        sweep_plans(plan, "experts")


def test_parse_layers():
    assert parse_layers("0-2", 4) == {0, 1, 2}
    assert parse_layers("-2:", 4) == {2, 3}
    assert parse_layers("0,3", 4) == {0, 3}
    assert parse_layers(None, 4) is None
    with pytest.raises(TrialError, match="names no layer"):
        parse_layers("7", 4)


def test_trial_of_all_layers_reproduces_quantize_model(plan, cache, tmp_path):
    report = quantize_model(plan, QuantizeConfig(calib=EXAMPLES / "calib.txt", eval=EXAMPLES / "eval.txt",
                                                 out=tmp_path / "q", **SETTING), log=lambda *a: None)
    trial = run_trial(cache, trial_plan(plan, None), "all")
    # the same sequential computation on the same batches: equal up to float32 summation order
    assert trial.ppl_before == pytest.approx(report.perplexity["before"], rel=1e-5)
    assert trial.ppl_after == pytest.approx(report.perplexity["after"], rel=1e-5)
    assert trial.agreement.keys() == report.agreement.keys()
    for layer, value in report.agreement.items():
        assert trial.agreement[layer] == pytest.approx(value, abs=2e-3)
    losses = {m["name"]: m["loss"] for m in report.modules}
    assert len(trial.modules) == len(losses) == 4 * (4 + 24)
    for m in trial.modules:
        assert m["loss"] == pytest.approx(losses[m["name"]], rel=1e-3)


def test_single_layer_trial_starts_from_the_cache(plan, cache, monkeypatch):
    loaded = []
    real = cache.load_layer
    monkeypatch.setattr(cache, "load_layer", lambda i: loaded.append(i) or real(i))
    result = run_trial(cache, trial_plan(plan, {2}), "layer 2")
    assert loaded == [2, 3]  # layers 0 and 1 are not run again: their outputs come from the cache
    assert result.layers == (2,) and {m["layer"] for m in result.modules} == {2}
    assert set(result.agreement) == {2, 3} and all(0.5 < a <= 1 for a in result.agreement.values())
    assert result.ppl_after != result.ppl_before and abs(result.ppl_increase) < 10
    assert result.ppl_before == cache.ppl_before
    table = trial_table([result])
    assert f"{result.ppl_increase:+.2f}%" in table and "layer 2" in table
    series = per_layer([result], 4)
    assert series["tokens"][2] == [m["tokens"] for m in sorted(result.modules, key=lambda m: m["expert"] or 0)
                                   if m["role"] == "expert" and m["name"].endswith("w1.weight")]
    assert sum(series["tokens"][2]) == 2 * 8 * 128  # top-2 routing: every calibration token twice


def test_trial_without_quantized_layers_is_an_error(plan, cache):
    with pytest.raises(TrialError, match="quantizes no decoder-layer tensor"):
        run_trial(cache, trial_plan(plan, set(), None), "none")


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when it is not installed
    with pytest.raises(TrialError, match=r"pip install 'moeq\[plot\]'"):
        plot_trials([], 4, tmp_path / "p.png")
