import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq.inventory import inventory_from_checkpoint, inventory_from_config
from moeq.padding import PaddingError, pad_plan, pad_target, pad_tensor, padded_config
from moeq.quant_format import QuantFormat, rtn

from support import DATA, FIXTURES, TINY_CONFIGS

QWEN = FIXTURES / "tiny-qwen2-moe"  # hidden 256, 16 experts of 256, shared expert 512, 4 layers


def test_pad_target_makes_every_tp_shard_whole_groups():
    assert pad_target(13696, tp=8, group_size=128) == 14336  # Qwen1.5-14B, the seed case
    assert pad_target(1408, tp=4, group_size=128) == 1536    # Qwen1.5-MoE-A2.7B experts
    assert pad_target(1536, tp=4, group_size=128) == 1536
    assert pad_target(100, tp=3, group_size=-1) == 102


def _config_dir(tmp_path: Path, fields: dict) -> Path:
    from transformers import AutoConfig

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields).to_dict()
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


# per family: the pad request, the config.json keys it must set, and the dims that follow
CASES = {
    "mixtral": (128, {"intermediate_size": 128}, {"expert_inter": (96, 128)}),
    "qwen2_moe": ({"expert": 64, "shared_expert": 96, "dense_mlp": 160},
                  {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 96, "intermediate_size": 160},
                  {"expert_inter": (32, 64), "shared_inter": (64, 96), "dense_inter": (128, 160)}),
    "qwen3_moe": ({"expert": 64, "dense_mlp": 160}, {"moe_intermediate_size": 64, "intermediate_size": 160},
                  {"expert_inter": (32, 64), "dense_inter": (128, 160)}),
    # shared experts are n_shared_experts x moe_intermediate_size wide: they follow the experts
    "deepseek_v2": (48, {"moe_intermediate_size": 48}, {"expert_inter": (32, 48), "shared_inter": (64, 96)}),
    "deepseek_v3": ({"expert": 64, "dense_mlp": 192}, {"moe_intermediate_size": 64, "intermediate_size": 192},
                    {"expert_inter": (32, 64), "shared_inter": (32, 64), "dense_inter": (128, 192)}),
    "olmoe": (40, {"intermediate_size": 40}, {"expert_inter": (32, 40)}),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_padded_config_implies_the_padded_shapes(kind, tmp_path):
    target, keys, dims = CASES[kind]
    fields = {**TINY_CONFIGS[kind], "mlp_only_layers": [1]} if kind == "qwen3_moe" else TINY_CONFIGS[kind]
    source = _config_dir(tmp_path / "src", fields)
    inventory = inventory_from_config(source)
    spec = pad_plan(inventory, target)
    assert spec.config_updates == keys
    assert spec.dims == dims
    config = json.loads((source / "config.json").read_text())
    out = tmp_path / "padded"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(padded_config(config, spec)))
    padded = inventory_from_config(out)
    assert [spec.shape_of(t) for t in inventory.tensors] == [t.shape for t in padded.tensors]
    grown = {t.role for t in inventory.tensors if t.name in spec.shapes}
    assert grown <= {"expert", "shared_expert", "dense_mlp", "mtp"} and "expert" in grown
    if kind == "deepseek_v3":  # the MTP layer (kept as stored) is padded like the decoder layers
        assert "model.layers.3.mlp.experts.0.down_proj.weight" in spec.shapes


def test_pad_errors_name_the_module(tmp_path):
    mixtral = inventory_from_config(_config_dir(tmp_path / "m", TINY_CONFIGS["mixtral"]))
    with pytest.raises(PaddingError, match=r"pad target 64 is smaller than the intermediate size 96 of "
                                           r"model\.layers\.0\.block_sparse_moe\.experts\.0\.w1"):
        pad_plan(mixtral, 64)
    assert pad_plan(mixtral, 96).shapes == {}  # equal: nothing to do
    formats = {t.name: QuantFormat(4, 32) for t in mixtral.tensors if t.role == "expert"}
    with pytest.raises(PaddingError, match=r"model\.layers\.0\.block_sparse_moe\.experts\.0\.w2 from 96 to 112 input "
                                           r"columns breaks its groups of 32"):
        pad_plan(mixtral, 112, formats)
    assert len(pad_plan(mixtral, 128, formats).shapes) == 24
    with pytest.raises(PaddingError, match="no dense_mlp MLP"):
        pad_plan(mixtral, {"dense_mlp": 128})
    with pytest.raises(PaddingError, match="cannot pad role 'attn'"):
        pad_plan(mixtral, {"attn": 128})
    deepseek = inventory_from_config(_config_dir(tmp_path / "d", TINY_CONFIGS["deepseek_v3"]))
    with pytest.raises(PaddingError, match="shared experts follow the experts"):
        pad_plan(deepseek, {"shared_expert": 64})


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 32, False), (8, -1, False), (3, -1, True)])
def test_quantized_padding_dequantizes_to_the_zero_padded_weight(tmp_path, bits, group_size, sym):
    inventory = inventory_from_config(_config_dir(tmp_path, TINY_CONFIGS["mixtral"]))  # experts [96, 64]
    spec = pad_plan(inventory, 128)
    fmt = QuantFormat(bits, group_size, sym)
    torch.manual_seed(0)
    for proj, name in (("gate", "w1"), ("down", "w2")):
        tensor = inventory.by_name[f"model.layers.1.block_sparse_moe.experts.3.{name}.weight"]
        w = torch.randn(tensor.shape)
        quantized = rtn(w, fmt)
        padded = pad_tensor(spec, tensor, quantized)
        n, k = spec.shape_of(tensor)
        groups = 1 if group_size == -1 else k // group_size
        assert (n, k) == ((128, 64) if proj == "gate" else (64, 128))
        assert padded.q.shape == (n, k) and padded.scales.shape == padded.zeros.shape == (n, groups)
        expected = torch.zeros(n, k)
        expected[:tensor.shape[0], :tensor.shape[1]] = quantized.dequantize()
        assert torch.equal(padded.dequantize(), expected)
        assert torch.equal(pad_tensor(spec, tensor, quantized.dequantize()), expected)
        # the original integers are untouched; new entries sit on their zero point
        assert torch.equal(padded.q[:tensor.shape[0], :tensor.shape[1]], quantized.q)
        assert bool((padded.scales > 0).all())


def _padded_pair(tmp_path: Path) -> tuple[Path, Path, dict]:
    """tiny-qwen2-moe with some experts and a shared expert quantized (RTN), written dequantized (bf16) twice:
    as is, and with experts padded 256 -> 384 and the shared expert 512 -> 640."""
    inventory = inventory_from_checkpoint(QWEN)
    formats = {}
    for t in inventory.tensors:
        if t.role == "expert" and t.layer == 0:
            formats[t.name] = QuantFormat(4, 128, True)
        elif t.role == "expert" and t.layer == 1 and t.expert < 4:
            formats[t.name] = QuantFormat(8, -1, False)  # per channel: down's new columns take each row's zero
        elif t.role == "shared_expert" and t.layer == 2:
            formats[t.name] = QuantFormat(4, 64, False)
    spec = pad_plan(inventory, {"expert": 384, "shared_expert": 640}, formats)
    weights = {}
    for shard in sorted({t.shard for t in inventory.tensors}):
        weights.update(load_file(str(QWEN / shard)))
    plain, padded = {}, {}
    for t in inventory.tensors:
        value = weights[t.name]
        if t.name in formats:
            quantized = rtn(value, formats[t.name])
            plain[t.name] = quantized.dequantize().to(value.dtype)
            padded[t.name] = pad_tensor(spec, t, quantized).dequantize().to(value.dtype)
        else:
            plain[t.name] = value
            padded[t.name] = pad_tensor(spec, t, value)
    config = json.loads((QWEN / "config.json").read_text())
    dirs = []
    for name, tensors, cfg in (("plain", plain, config), ("padded", padded, padded_config(config, spec))):
        out = tmp_path / name
        out.mkdir()
        save_file(tensors, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(cfg))
        dirs.append(out)
    return dirs[0], dirs[1], spec.config_updates


def test_padded_model_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain_dir, padded_dir, updates = _padded_pair(tmp_path)
    assert updates == {"moe_intermediate_size": 384, "shared_expert_intermediate_size": 640}
    inventory = inventory_from_checkpoint(padded_dir)  # every shape agrees with the padded config.json
    assert inventory.by_name["model.layers.0.mlp.experts.5.down_proj.weight"].shape == (256, 384)
    tokenizer = AutoTokenizer.from_pretrained(QWEN)
    ids = tokenizer((DATA / "eval.txt").read_text()[:4000])["input_ids"]
    windows = torch.tensor([ids[i * 48:(i + 1) * 48] for i in range(3)])  # 3 windows of 48 tokens
    logits = []
    for path in (plain_dir, padded_dir):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(windows).logits)
    assert model.config.moe_intermediate_size == 384
    assert model.model.layers[0].mlp.experts.down_proj.shape[-1] == 384
    assert model.model.layers[2].mlp.shared_expert.down_proj.weight.shape == (256, 640)
    # float32 sums over 384 instead of 256 channels (the extra ones exactly 0) differ only in summation order:
    # measured max |difference| 1e-5 on logits up to 16
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-4)
