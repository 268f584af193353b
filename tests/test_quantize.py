import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeq
import moeq.quantize as quantize_module
from moeq.errors import CheckpointError, MoeqError
from moeq.inventory import inventory_from_checkpoint
from moeq.loader import StoredCheckpoint
from moeq.plan import make_plan
from moeq.quantize import CALIBRATION, EVALUATION, READING, SETUP, WRITING, QuantizeConfig, quantize_model
from moeq.recipe import load_recipe

from support import EXAMPLES, TINY_CONFIGS

DEMO = EXAMPLES / "demo-mixtral"


def _config(out, **changes):
    base = dict(calib=EXAMPLES / "calib.txt", out=out, calib_samples=16, seq_len=128, device="cpu")
    return QuantizeConfig(**{**base, **changes})


def _plan():
    return make_plan(inventory_from_checkpoint(DEMO), load_recipe("mixtral"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out  # packed tensors as stored: equality below is bit-exact


def test_quantize_demo_end_to_end(tmp_path):
    report = quantize_model(_plan(), _config(tmp_path / "q", eval=EXAMPLES / "eval.txt", eval_windows=16),
                            log=lambda *a: None)
    before, after = report.perplexity["before"], report.perplexity["after"]
    # loose bound (the benchmark prints the real numbers): int4 GPTQ moves PPL a little, never a collapse
    assert 25 < before < 45 and abs(after / before - 1) < 0.15
    assert set(report.agreement) == {0, 1, 2, 3} and min(report.agreement.values()) > 0.8
    assert len(report.modules) == 4 * (4 + 24)
    out = tmp_path / "q"
    sidecar = json.loads((out / "moeq.json").read_text())
    assert sidecar["report"]["perplexity"]["after"] == pytest.approx(after)
    # the run's time, split into phases that add up to at most the whole
    assert set(report.phases) == {CALIBRATION, SETUP, EVALUATION, READING, WRITING}
    assert all(s > 0 for s in report.phases.values()) and sum(report.phases.values()) <= report.seconds
    assert sidecar["report"]["phases"] == pytest.approx(report.phases)
    assert StoredCheckpoint(out).inventory.num_experts == 8  # reloads as a complete checkpoint of the family
    assert not (tmp_path / "q.partial").exists()


def test_eval_text_must_not_be_the_calibration_text(tmp_path):
    with pytest.raises(MoeqError, match="is the calibration text"):
        quantize_model(_plan(), _config(tmp_path / "q", eval=EXAMPLES / "calib.txt"), log=lambda *a: None)


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "q").mkdir()
    with pytest.raises(CheckpointError, match="pass --force"):
        quantize_model(_plan(), _config(tmp_path / "q"), log=lambda *a: None)


def test_resume_after_a_crash_gives_identical_results(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    quantize_model(_plan(), _config(clean), log=lambda *a: None)

    real = quantize_module.quantize_layer

    def crash_at_layer_2(layer, index, *args, **kwargs):
        if index == 2:
            raise RuntimeError("killed")
        return real(layer, index, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize_layer", crash_at_layer_2)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        quantize_model(_plan(), _config(resumed), log=lambda *a: None)
    state_file = tmp_path / "resumed.partial" / "resume.pt"
    assert not resumed.exists() and state_file.is_file()
    # finished layers' tensors live in their shards only, not in memory or in every resume state
    state = torch.load(state_file, weights_only=False)
    assert len(state["results"]) == 2 * 28 and all(r.quantized is None for r in state["results"])
    monkeypatch.setattr(quantize_module, "quantize_layer", real)
    messages = []
    quantize_model(_plan(), _config(resumed, resume=True), log=messages.append)
    assert any("resuming from layer 2" in m for m in messages)
    a, b = _tensors(clean), _tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_every_family_quantizes_and_reloads_close_to_its_original(kind, tiny_quantized):
    """Each family's recipe as shipped, end to end: the checkpoint reloads as the model it came from, not garbage
    (random weights: int4 experts and int8 attention move the logits by 0.5-2.5%)."""
    source, out = tiny_quantized(kind)
    original_model, reloaded_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), moeq.load(out)
    ids = torch.randint(0, original_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original, reloaded = original_model(ids).logits, reloaded_model(ids).logits
    assert ((reloaded - original).norm() / original.norm()).item() < 0.1
    assert (reloaded.argmax(-1) == original.argmax(-1)).float().mean().item() > 0.9
