import pytest
from transformers import AutoConfig

from moeq.errors import UnsupportedModelError
from moeq.families import FAMILIES, ROLES, family_for, model_dims

from support import TINY_CONFIGS


def _config(kind, **changes):
    fields = {**TINY_CONFIGS[kind], **changes}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def test_unsupported_model_names_families_and_where_to_add():
    with pytest.raises(UnsupportedModelError) as err:
        family_for("llama")
    message = str(err.value)
    assert "'llama'" in message and "mixtral" in message and "deepseek_v3" in message
    assert "moeq/families.py" in message


def test_every_rule_has_a_known_role_and_resolvable_dims():
    for kind in TINY_CONFIGS:
        family = family_for(TINY_CONFIGS[kind]["model_type"])
        dims = model_dims(family, _config(kind))
        for rule in family.model_tensors + family.layer_tensors + family.extra_layer_tensors:
            assert rule.role in ROLES, rule
            assert all(d in dims for d in rule.shape), (kind, rule)
            assert rule.when is None or rule.when in dims


def test_model_types_are_unique_across_families():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))


def test_qwen_dense_layers_follow_mlp_only_layers_and_sparse_step():
    family = family_for("qwen2_moe")
    config = _config("qwen2_moe", num_hidden_layers=6, mlp_only_layers=[0], decoder_sparse_step=2)
    assert [i for i in range(6) if family.moe_layer(config, i)] == [1, 3, 5]


def test_deepseek_dense_layers_follow_first_k_dense_replace():
    family = family_for("deepseek_v3")
    config = _config("deepseek_v3", num_hidden_layers=5, first_k_dense_replace=2)
    assert [i for i in range(5) if family.moe_layer(config, i)] == [2, 3, 4]
