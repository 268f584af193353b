import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from moeq.calibration import evaluation_windows, read_token_stream
from moeq.errors import CheckpointError
from moeq.evaluate import model_perplexity
from moeq.inventory import inventory_from_checkpoint
from moeq.loader import StoredCheckpoint, load
from moeq.plan import make_plan
from moeq.quantize import QuantizeConfig, quantize_model
from moeq.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO = EXAMPLES / "demo-mixtral"
MIXED = ["rules.0.bits=4", "rules.0.group_size=32", "rules.0.sym=false"]  # attention int4 g32 asym, experts int4 g128


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The demo quantized once per format with a mixed recipe; {format: (path, report)}."""
    root = tmp_path_factory.mktemp("q")
    plan = make_plan(inventory_from_checkpoint(DEMO), load_recipe("mixtral", MIXED))
    out = {}
    for fmt in ("gptq", "compressed-tensors", "dequantized"):
        config = QuantizeConfig(calib=EXAMPLES / "calib.txt", eval=EXAMPLES / "eval.txt", out=root / fmt,
                                calib_samples=16, seq_len=128, eval_windows=16, device="cpu", format=fmt)
        out[fmt] = (root / fmt, quantize_model(plan, config, log=lambda *a: None))
    return out


def _eval_windows():
    stream = read_token_stream(EXAMPLES / "eval.txt", AutoTokenizer.from_pretrained(DEMO))
    return evaluation_windows(stream, 16, 128)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "dequantized"])
def test_loaded_model_reproduces_the_measured_perplexity(quantized, fmt):
    path, report = quantized[fmt]
    ppl = model_perplexity(load(path), _eval_windows())
    assert ppl == pytest.approx(report.perplexity["after"], rel=1e-3)


def test_loaded_model_generates_with_a_kv_cache(quantized):
    # calibration builds the model without a cache; generate() on a loaded model must keep one
    model = load(quantized["gptq"][0])
    ids = _eval_windows()[:1, :16]
    assert model.config.use_cache and model(input_ids=ids).past_key_values is not None
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(out, uncached)


def test_formats_hold_the_same_weights(quantized):
    a = StoredCheckpoint(quantized["gptq"][0])
    b = StoredCheckpoint(quantized["compressed-tensors"][0])
    c = StoredCheckpoint(quantized["dequantized"][0])
    for t in a.inventory.tensors:
        wa = a.read(t)
        assert torch.equal(wa, b.read(t)), t.name
        assert torch.equal(wa, c.read(t)), t.name


def test_headers_say_what_each_module_holds(quantized):
    config = json.loads((quantized["gptq"][0] / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == "gptq_v2"  # an asymmetric scheme: zero points stored exactly
    stored = StoredCheckpoint(quantized["gptq"][0])
    assert stored.schemes["model.layers.2.self_attn.q_proj.weight"] == (4, 32, False)
    assert stored.schemes["model.layers.2.block_sparse_moe.experts.7.w2.weight"] == (4, 128, True)
    assert stored.schemes["model.layers.2.block_sparse_moe.gate.weight"] is None
    ct = json.loads((quantized["compressed-tensors"][0] / "config.json").read_text())["quantization_config"]
    assert ct["format"] == "pack-quantized" and len(ct["config_groups"]) == 2
    sidecar = json.loads((quantized["gptq"][0] / "moeq.json").read_text())
    assert sidecar["format"] == "gptq" and sidecar["recipe"]["rules"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_missing_tensor_and_wrong_dtype(quantized, tmp_path):
    src = quantized["gptq"][0]
    broken = _copy(src, tmp_path / "truncated")
    shard = broken / "model-00002-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00005.safetensors.*truncated"):
        load(broken)

    missing = _copy(src, tmp_path / "missing")
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w2.qzeros"]
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2: tensor 'qzeros' is missing"):
        load(missing)

    wrong = _copy(src, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["quantization_config"]["bits"] = 8  # header says 8 bits, tensors hold 4
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="experts"):
        StoredCheckpoint(wrong).read(StoredCheckpoint(wrong).inventory.by_name[
            "model.layers.0.block_sparse_moe.experts.0.w1.weight"])
