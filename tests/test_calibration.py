import json

import pytest
import torch
from safetensors.torch import save_file

from moeq.calibration import calibration_windows, coverage_advice, evaluation_windows, read_token_stream
from moeq.errors import MoeqError

from support import DATA, FIXTURES


class _Tokenizer:
    """Byte-level stand-in: one token per character."""

    def __call__(self, text, return_attention_mask=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_text_jsonl_and_pretokenized_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    torch.save(torch.arange(10), tmp_path / "a.pt")
    save_file({"input_ids": torch.arange(6).reshape(2, 3)}, str(tmp_path / "a.safetensors"))
    tok = _Tokenizer()
    assert read_token_stream(tmp_path / "a.txt", tok).tolist() == [ord(c) for c in "hello world"]
    assert read_token_stream(tmp_path / "a.jsonl", tok).tolist() == [ord(c) for c in "hello\n\nworld"]
    assert read_token_stream(tmp_path / "a.pt", tok).tolist() == list(range(10))
    assert read_token_stream(tmp_path / "a.safetensors", tok).tolist() == list(range(6))


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(MoeqError, match=r"b.jsonl:1: no field 'text'"):
        read_token_stream(tmp_path / "b.jsonl", _Tokenizer())
    with pytest.raises(MoeqError, match="not found"):
        read_token_stream(tmp_path / "missing.txt", _Tokenizer())
    with pytest.raises(MoeqError, match="fewer than one window of 8"):
        calibration_windows(torch.arange(5), 2, 8, seed=0)


def test_windows_are_seeded_and_evaluation_is_contiguous():
    stream = torch.arange(1000)
    a = calibration_windows(stream, 4, 16, seed=3)
    assert a.shape == (4, 16) and torch.equal(a, calibration_windows(stream, 4, 16, seed=3))
    assert not torch.equal(a, calibration_windows(stream, 4, 16, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))  # each window is contiguous
    e = evaluation_windows(stream, 64, 100)
    assert e.shape == (10, 100) and e[3, 0] == 300


def test_coverage_advice_scales_with_model_size():
    assert coverage_advice(17_000_000, 128, 512) == []
    advice = coverage_advice(46_700_000_000, 128, 512)
    assert "854" in advice[0] and "1024" in advice[1]


@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_text_gives_the_tokenizers_own_ids(model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / model)
    text = (DATA / "calib.txt").read_text()[:50_000]
    (tmp_path / "t.txt").write_text(text)
    assert read_token_stream(tmp_path / "t.txt", tokenizer).tolist() == tokenizer(text)["input_ids"]
