import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from moeq.errors import CheckpointError
from moeq.families import ROLES
from moeq.inventory import inventory_from_checkpoint, inventory_from_config

from support import FIXTURES, TINY_CONFIGS

# Real configs, written out: planning a model before downloading it.
REAL_CONFIGS = {
    "Mixtral-8x7B": ({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                      "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                      "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1e6,
                      "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, 46.7e9),
    "Qwen3-30B-A3B": ({"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                       "moe_intermediate_size": 768, "head_dim": 128, "num_attention_heads": 32,
                       "num_key_value_heads": 4, "num_hidden_layers": 48, "num_experts": 128,
                       "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                       "norm_topk_prob": True, "attention_bias": False, "vocab_size": 151936,
                       "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1e6,
                       "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, 30.5e9),
    "DeepSeek-V3": ({"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                     "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
                     "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128,
                     "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                     "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
                     "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                     "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                     "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840,
                     "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                     "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, 671e9),
}


def _check_roles(inv):
    assert all(t.role in ROLES for t in inv.tensors)
    experts = Counter((t.layer, t.proj) for t in inv.tensors if t.role == "expert")
    assert set(experts.values()) == {inv.num_experts}  # every expert of every MoE layer, all three projections
    assert {p for (_, p) in experts} == {"gate", "up", "down"}


@pytest.mark.parametrize("name", ["demo-mixtral", "tiny-mixtral", "tiny-qwen2-moe"])
def test_shared_fixtures_every_tensor_has_a_role(name):
    inv = inventory_from_checkpoint(FIXTURES / name)
    _check_roles(inv)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    assert inv.num_experts == config.get("num_local_experts", config.get("num_experts"))
    assert inv.moe_layers == tuple(range(config["num_hidden_layers"]))
    # the config-only listing is exactly what is on disk
    assert {(t.name, t.shape) for t in inventory_from_config(FIXTURES / name).tensors} == \
        {(t.name, t.shape) for t in inv.tensors}


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_tiny_checkpoints_of_every_family(kind, tiny_checkpoints):
    inv = inventory_from_checkpoint(tiny_checkpoints[kind])
    _check_roles(inv)
    roles = Counter(t.role for t in inv.tensors)
    if kind in ("qwen2_moe", "deepseek_v3", "deepseek_v2"):
        assert roles["dense_mlp"] == 3 and roles["shared_expert"] > 0
    if kind == "qwen2_moe":
        assert inv.moe_layers == (0, 2) and roles["router_gate"] == 2
    if kind == "deepseek_v3":
        assert inv.moe_layers == (1, 2)
        assert {t.proj for t in inv.tensors if t.role == "attn"} == {"q_a", "q_b", "kv_a", "kv_b", "o"}
    if kind == "deepseek_v2":  # q_lora_rank null: plain q_proj
        assert {t.proj for t in inv.tensors if t.role == "attn"} == {"q", "kv_a", "kv_b", "o"}


@pytest.mark.parametrize("model", sorted(REAL_CONFIGS))
def test_config_only_parameter_counts(model, tmp_path):
    config, expected = REAL_CONFIGS[model]
    (tmp_path / "config.json").write_text(json.dumps(config))
    inv = inventory_from_config(tmp_path / "config.json")
    in_model = sum(t.numel for t in inv.tensors if t.layer is None or t.layer < inv.num_layers)
    assert abs(in_model - expected) / expected < 0.01, in_model
    _check_roles(inv)


def test_deepseek_v3_lists_its_mtp_layer_apart(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS["DeepSeek-V3"][0]))
    inv = inventory_from_config(tmp_path / "config.json")
    mtp = [t for t in inv.tensors if t.role == "mtp"]
    assert {t.layer for t in mtp} == {61}
    assert 13e9 < sum(t.numel for t in mtp) < 15e9  # the 14B of 685B that transformers does not load


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _rewrite_header(path: Path, edit):
    """Rewrite a single-file checkpoint's header through `edit(header)` (tensor data left as is)."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_truncated_shard_is_named(tmp_path):
    model = _copy(FIXTURES / "demo-mixtral", tmp_path / "m")
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        inventory_from_checkpoint(model)


def test_corrupt_header_is_named(tmp_path):
    model = _copy(FIXTURES / "demo-mixtral", tmp_path / "m")
    shard = model / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        inventory_from_checkpoint(model)


def test_unknown_tensor_is_an_error(tmp_path):
    model = _copy(FIXTURES / "demo-mixtral", tmp_path / "m")
    _rewrite_header(model / "model.safetensors",
                    lambda h: h.__setitem__("model.layers.0.mystery.weight", h["model.norm.weight"]))
    with pytest.raises(CheckpointError, match=r"no rule of family 'mixtral' explains tensor model\.layers\.0\.mystery"):
        inventory_from_checkpoint(model)


def test_expert_beyond_config_is_named(tmp_path):
    model = _copy(FIXTURES / "demo-mixtral", tmp_path / "m")
    name = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    _rewrite_header(model / "model.safetensors", lambda h: h.__setitem__(name.format(8), h[name.format(0)]))
    with pytest.raises(CheckpointError, match="expert 8 but config.json has 8 experts"):
        inventory_from_checkpoint(model)


def test_missing_and_misshapen_tensors(tmp_path):
    model = _copy(FIXTURES / "demo-mixtral", tmp_path / "m")
    name = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    _rewrite_header(model / "model.safetensors", lambda h: h.pop(name))
    with pytest.raises(CheckpointError, match=f"missing, e.g. {name}"):
        inventory_from_checkpoint(model)
    model2 = _copy(FIXTURES / "demo-mixtral", tmp_path / "m2")
    config = json.loads((model2 / "config.json").read_text())
    (model2 / "config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    with pytest.raises(CheckpointError, match=r"shape \[256, 128\] but config.json implies \[512, 128\]"):
        inventory_from_checkpoint(model2)


def test_missing_config_and_shard(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        inventory_from_checkpoint(tmp_path)
    model = _copy(FIXTURES / "tiny-mixtral", tmp_path / "m")
    (model / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors, which is missing"):
        inventory_from_checkpoint(model)
