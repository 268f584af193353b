from pathlib import Path

import pytest

from moeq.inventory import inventory_from_checkpoint
from moeq.sensitivity import (DEFAULT_CANDIDATES, DEFAULT_CANDIDATES_SPEC, Sensitivity, SensitivityConfig,
                              SensitivityError, measure_sensitivity, model_units, parse_candidates, sensitivity_table,
                              spearman)
from moeq.trial import ActivationCache, TrialConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO = EXAMPLES / "demo-mixtral"
DEFAULTS = {"method": "gptq", "group_size": 128, "sym": True, "act_order": True, "damp": 0.01}


def _decided(inventory):
    return {t.name for t in inventory.tensors if t.quantizable and t.layer is not None
            and t.role not in ("lm_head",)}


@pytest.mark.parametrize("granularity, per_layer", [("vllm", 4), ("proj", 5), ("expert", 3 + 2 * 8)])
def test_units_partition_every_decided_tensor_of_mixtral(granularity, per_layer):
    inventory = inventory_from_checkpoint(DEMO)
    units = model_units(inventory, granularity)
    names = [name for u in units for name, _, _ in u.tensors]
    assert len(names) == len(set(names)) and set(names) == _decided(inventory)
    assert len(units) == 4 * per_layer
    qkv = next(u for u in units if u.layer == 0 and u.role == "attn" and "q" in u.projs)
    assert qkv.projs == ("q", "k", "v") and qkv.params == 128 * 128 + 2 * 64 * 128


def test_units_of_qwen2_moe_and_deepseek(tiny_checkpoints):
    qwen = inventory_from_checkpoint(tiny_checkpoints["qwen2_moe"])
    keys = {u.key for u in model_units(qwen, "vllm")}
    # layer 1 is dense (mlp_only_layers): a dense MLP, no router or experts
    assert {"L0.router_gate", "L0.shared_expert.gate+up", "L0.shared_expert.down", "L0.expert.gate+up+down",
            "L1.dense_mlp.gate+up", "L1.dense_mlp.down"} <= keys
    assert not any(k.startswith("L1.expert") or k == "L1.router" for k in keys)
    deepseek = inventory_from_checkpoint(tiny_checkpoints["deepseek_v3"])
    keys = {u.key for u in model_units(deepseek, "proj")}
    assert {"L0.attn.q_a+kv_a", "L0.attn.q_b", "L0.attn.kv_b", "L0.attn.o",
            "L1.expert.gate+up", "L1.expert.down"} <= keys
    names = [n for u in model_units(deepseek, "proj") for n, _, _ in u.tensors]
    assert set(names) == _decided(deepseek)  # e_score_correction_bias is 1-D: never a unit


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = [0, 1.5, 1.5, 3], y = [0, 1, 2, 3]: cov 4.5, var 4.5 * 5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def test_candidates_parse():
    assert parse_candidates(DEFAULT_CANDIDATES_SPEC) == DEFAULT_CANDIDATES
    assert parse_candidates("4") == ({"bits": 4, "group_size": 128},)
    with pytest.raises(SensitivityError, match="unknown flag"):
        parse_candidates("3:128:fast")


@pytest.fixture(scope="module")
def demo_sensitivity():
    inventory = inventory_from_checkpoint(DEMO)
    cache = ActivationCache(inventory, TrialConfig(calib=EXAMPLES / "calib.txt", eval=EXAMPLES / "eval.txt",
                                                   calib_samples=8, seq_len=128, eval_windows=4, probe_windows=4,
                                                   device="cpu"), log=lambda *a: None)
    config = SensitivityConfig(candidates=({"bits": 2, "group_size": 64}, {"bits": 8, "group_size": -1}),
                               defaults=DEFAULTS, granularity="vllm", validate=True, layers=(3,))
    return inventory, measure_sensitivity(cache, inventory, config, log=lambda *a: None)


def test_sensitivity_costs_on_demo(demo_sensitivity, tmp_path):
    inventory, s = demo_sensitivity
    by_unit = s.by_unit()
    assert {u.layer for u in s.units} == {3} and set(s.alpha) == {3}
    assert len(s.measurements) == 3 * 2 + 1  # router: int8 only (floor); others: int2 and int8
    for unit in s.units:
        ms = {m.candidate["bits"]: m for m in by_unit[unit.key]}
        assert set(ms) == ({8} if unit.role == "router" else {2, 8})
        for m in ms.values():
            assert m.cost == pytest.approx(s.alpha[unit.layer] * m.block_error, rel=1e-12)
            assert m.block_error > 0 and m.gptq_error > 0 and m.ppl_increase is not None
        if unit.role != "router":
            assert ms[2].cost > 10 * ms[8].cost  # int2 does far more damage than int8, in every unit
            assert ms[8].bits == pytest.approx(sum(n * (8 + 16 / k) for _, n, k in unit.tensors))
            assert 0 < ms[8].agreement <= 1 and ms[2].agreement < ms[8].agreement + 1e-9
    assert all(a > 0 for a in s.alpha.values())
    validated = [m for m in s.measurements]
    assert spearman([m.cost for m in validated], [m.ppl_increase for m in validated]) > 0.5
    path = tmp_path / "s.json"
    s.save(path)
    assert Sensitivity.load(path) == s
    table = sensitivity_table(s)
    assert "L3.expert.gate+up+down" in table and "Spearman rank correlation" in table
    assert "L2." not in table
