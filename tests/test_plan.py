import pytest

from moeq.cli import default_recipe_name
from moeq.errors import RecipeError
from moeq.inventory import inventory_from_checkpoint
from moeq.plan import make_plan, render_plan
from moeq.recipe import load_recipe

from support import FIXTURES, TINY_CONFIGS


def _recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_numbers_checked_by_hand_on_demo_mixtral():
    plan = make_plan(inventory_from_checkpoint(FIXTURES / "demo-mixtral"), load_recipe("mixtral"))
    # demo-mixtral: hidden 128, 4 layers, 8 experts of intermediate 256, 4 heads / 2 kv heads, vocab 8192, tied.
    embed, norms = 8192 * 128, 9 * 128
    attn = 4 * (128 * 128 + 64 * 128 + 64 * 128 + 128 * 128)
    routers = 4 * 8 * 128
    experts = 4 * 8 * 3 * 256 * 128
    totals = plan.totals()
    assert totals["params"] == embed + norms + attn + routers + experts == 4_396_160
    assert totals["quantized_params"] == attn + experts
    # int8 per channel over K=128: 8 + 16/128; int4 g128 sym: 4 + 16/128; kept bf16: 16
    bits = 16 * (embed + norms + routers) + (8 + 16 / 128) * attn + (4 + 16 / 128) * experts
    assert totals["avg_bits"] == pytest.approx(bits / totals["params"])
    assert totals["bytes"] == pytest.approx(bits / 8)
    assert totals["bf16_bytes"] == 2 * totals["params"]
    assert plan.warnings == ()


def test_asymmetric_and_per_channel_bits_per_weight(tmp_path):
    plan = make_plan(inventory_from_checkpoint(FIXTURES / "demo-mixtral"),
                     _recipe(tmp_path, "rules: [{role: expert, proj: down, bits: 3, sym: false, group_size: 32}]"))
    entry = plan.by_name["model.layers.0.block_sparse_moe.experts.0.w2.weight"]
    assert entry.bits_per_weight == 3 + (16 + 3) / 32
    assert plan.by_name["model.layers.0.block_sparse_moe.experts.0.w1.weight"].scheme is None


def test_group_size_must_divide_the_module_input(tmp_path):
    inv = inventory_from_checkpoint(_tiny("mixtral"))  # hidden size 64
    with pytest.raises(RecipeError, match=r"r.yaml rule 0: group_size 128 does not divide the input size 64 "
                                          r"of model\.layers\.0\.self_attn\.q_proj"):
        make_plan(inv, _recipe(tmp_path, "rules: [{role: attn, bits: 4, group_size: 128}]"))


def _tiny(kind):
    # the session fixture is not available at import; tests that need it take it as an argument
    return _TINY[kind]


_TINY = {}


@pytest.fixture(autouse=True)
def _tiny_paths(tiny_checkpoints):
    _TINY.update(tiny_checkpoints)


def test_rule_matching_nothing_is_a_warning(tmp_path):
    plan = make_plan(inventory_from_checkpoint(FIXTURES / "demo-mixtral"),
                     _recipe(tmp_path, "rules: [{role: expert, bits: 4}, {role: shared_expert, bits: 8}]"))
    assert plan.warnings == ("r.yaml rule 1 matches no tensor of this model",)


def test_vllm_checks_warn_or_refuse(tmp_path):
    inv = inventory_from_checkpoint(FIXTURES / "demo-mixtral")
    mixed = _recipe(tmp_path, """
rules:
  - {role: expert, bits: 4}
  - {role: expert, layers: "1", experts: [2], bits: 8}
  - {role: router, bits: 8, group_size: -1}
  - {role: attn, bits: 8, group_size: -1}
  - {role: attn, proj: v, layers: "0", bits: 4}
""")
    plan = make_plan(inv, mixed)
    text = "\n".join(plan.warnings)
    assert "layer 1: its experts mix schemes" in text
    assert "layer 0: its experts mix schemes" not in text
    assert "the router is quantized" in text
    assert "layer 0: attn q/k/v differ in scheme" in text and "layer 1: attn q/k/v" not in text
    with pytest.raises(RecipeError, match="vLLM could not serve this recipe"):
        make_plan(inv, mixed, target="vllm")
    assert make_plan(inv, load_recipe("mixtral"), target="vllm").warnings == ()


def test_recipe_for_another_family_is_refused():
    with pytest.raises(RecipeError, match="for family 'qwen2_moe' but the model is 'mixtral'"):
        make_plan(inventory_from_checkpoint(FIXTURES / "demo-mixtral"), load_recipe("qwen2_moe"))


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_family_recipes_plan_cleanly_for_vllm(kind):
    inv = inventory_from_checkpoint(_tiny(kind))
    # the tiny models' hidden size is 64, so group 32
    plan = make_plan(inv, load_recipe(default_recipe_name(inv.family.name), ["defaults.group_size=32"]),
                     target="vllm")
    # experts int4, routers kept, nothing unexplained
    for e in plan.entries:
        if e.tensor.role == "expert":
            assert e.scheme.bits == 4
        if e.tensor.role in ("router", "router_gate", "norm", "embed", "lm_head"):
            assert e.scheme is None
    assert "average bits/weight" in render_plan(plan)
