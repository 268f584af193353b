import pytest

from moeq.errors import RecipeError
from moeq.inventory import TensorInfo
from moeq.recipe import BUILTIN_RECIPES, index_set, load_recipe


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _tensor(role="expert", proj="gate", layer=0, expert=0, name="model.layers.0.mlp.experts.0.gate_proj.weight"):
    return TensorInfo(name, (64, 128), "BF16", role, proj, layer, expert)


def test_index_specs():
    assert index_set("0-2", 10) == {0, 1, 2}
    assert index_set("-4:", 10) == {6, 7, 8, 9}
    assert index_set(":2", 10) == {0, 1}
    assert index_set(-1, 10) == {9}
    assert index_set("-1", 10) == {9}
    assert index_set([0, "5-6", "-1:"], 10) == {0, 5, 6, 9}
    assert index_set("8-20", 10) == {8, 9}
    assert index_set(12, 10) == set()
    with pytest.raises(RecipeError, match="index spec 'two'"):
        index_set("two", 10)


def test_last_matching_rule_wins_wholesale(tmp_path):
    path = _write(tmp_path, "r.yaml", """
defaults: {group_size: 64}
rules:
  - {role: expert, bits: 4, sym: false}
  - {role: expert, layers: "1", bits: 8}
""")
    recipe = load_recipe(path)
    scheme, rule = recipe.scheme_for(_tensor(layer=0), 4, 8)
    assert (scheme.bits, scheme.sym, scheme.group_size, rule) == (4, False, 64, 0)
    scheme, rule = recipe.scheme_for(_tensor(layer=1), 4, 8)
    # the later rule decides alone: sym comes from the defaults, not from the earlier rule
    assert (scheme.bits, scheme.sym, scheme.group_size, rule) == (8, True, 64, 1)
    assert recipe.scheme_for(_tensor(role="attn", proj="q", expert=None), 4, 8) == (None, None)


def test_selectors_by_proj_expert_and_name(tmp_path):
    path = _write(tmp_path, "r.yaml", """
rules:
  - {role: expert, bits: 4}
  - {role: expert, proj: down, experts: [3], bits: 8}
  - {name: 'experts\\.7\\.', bits: 2}
""")
    recipe = load_recipe(path)
    assert recipe.scheme_for(_tensor(proj="down", expert=3), 4, 8)[0].bits == 8
    assert recipe.scheme_for(_tensor(proj="gate", expert=3), 4, 8)[0].bits == 4
    seven = _tensor(expert=7, name="model.layers.0.mlp.experts.7.gate_proj.weight")
    assert recipe.scheme_for(seven, 4, 8)[0].bits == 2


def test_extends_merges_defaults_and_appends_rules(tmp_path):
    _write(tmp_path, "parent.yaml", """
family: mixtral
defaults: {group_size: 64, damp: 0.05}
rules:
  - {role: expert, bits: 4}
  - {role: attn, bits: 8}
""")
    child = _write(tmp_path, "child.yaml", """
extends: parent.yaml
defaults: {group_size: 32}
rules:
  - {role: attn, layers: "0", bits: 16}
""")
    recipe = load_recipe(child)
    assert recipe.family == "mixtral"
    assert len(recipe.rules) == 3
    assert recipe.rules[0].scheme.group_size == 32 and recipe.rules[0].scheme.damp == 0.05
    attn0 = _tensor(role="attn", proj="q", layer=0, expert=None)
    assert recipe.scheme_for(attn0, 4, 8)[0].keep
    assert recipe.rules[2].where == "child.yaml rule 0"


def test_extends_builtin_and_loop(tmp_path):
    recipe = load_recipe(_write(tmp_path, "r.yaml", "extends: mixtral\nrules: [{role: expert, bits: 3}]\n"))
    assert recipe.rules[-1].scheme.bits == 3 and recipe.family == "mixtral"
    _write(tmp_path, "a.yaml", "extends: b.yaml\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "a.yaml")


def test_overrides_by_dotted_path():
    recipe = load_recipe("mixtral", ["defaults.group_size=64", "rules.-1.bits=8"])
    expert_rule = next(r for r in recipe.rules if r.selector.roles == ("expert",))
    assert expert_rule.scheme.group_size == 64  # from the overridden defaults
    assert recipe.rules[-1].scheme.bits == 8
    assert recipe.source["defaults"]["group_size"] == 64
    with pytest.raises(RecipeError, match="not a rule index"):
        load_recipe("mixtral", ["rules.99.bits=8"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe("mixtral", ["defaults.bits"])


@pytest.mark.parametrize("text, message", [
    ("rules: [{role: expert, bitz: 4}]", "unknown key 'bitz' (did you mean 'bits'?)"),
    ("rulez: []", "unknown key 'rulez' (did you mean 'rules'?)"),
    ("defaults: {groupsize: 64}", "unknown scheme key 'groupsize' (did you mean 'group_size'?)"),
    ("rules: [{role: experts, bits: 4}]", "unknown role 'experts' (did you mean 'expert'?)"),
    ("rules: [{role: expert, bits: 5}]", "bits 5 is not supported"),
    ("rules: [{role: expert, bits: 4, group_size: 100}]", "group_size 100 is not supported"),
    ("rules: [{role: expert, bits: 4, method: awq}]", "method 'awq'"),
    ("rules: [{role: expert, bits: 4, damp: 0}]", "damp 0"),
    ("rules: [{role: expert, bits: 4, starved: skip}]", "starved 'skip'"),
    ("rules: [{role: norm, bits: 8}]", "role 'norm' cannot be quantized"),
    ("rules: [{role: expert, layers: 'x-y', bits: 4}]", "index spec 'x-y'"),
    ("rules: [{name: '(', bits: 4}]", "not a valid regex"),
    ("rules: [{role: expert, bits: 4, sym: maybe}]", "sym must be true or false"),
    ("rules: {role: expert}", "`rules` must be a list"),
    ("- just a list", "a recipe is a mapping"),
])
def test_validation_errors_name_the_rule_and_key(tmp_path, text, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, "bad.yaml", text))
    assert message in str(err.value)
    assert "bad.yaml" in str(err.value)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(RecipeError, match="built-in name .*mixtral.*did you mean 'mixtral'"):
        load_recipe("mixtrall")


def test_every_builtin_recipe_loads():
    names = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "uniform-int4"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.source.get("description")
