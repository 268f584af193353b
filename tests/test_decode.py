"""greedy_generate gives generate()'s greedy tokens, and its decode step never syncs with the host.

On the CPU, moeq.load gives the dequantized reference path: the fixtures' plain transformers modules
(a quantized checkpoint loads into the same modules, its weights dequantized once). The CUDA graph itself
is exercised by the GPU tests at the end.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, StaticCache

import moeq
from moeq.decode import decode_step, greedy_generate
from moeq.errors import GraphCaptureError

from support import EXAMPLES, FIXTURES, TINY_CONFIGS, quantize_for_kernels

MODELS = ["tiny-mixtral", "tiny-qwen2-moe"]
PROMPT_LEN, NEW_TOKENS = 16, 12
# host syncs on a CUDA tensor; on the CPU they are free, so the test makes them raise instead
SYNCS = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                                           "nonzero")] + [(torch, "nonzero")]


class HostSync(Exception):
    pass


def _forbid_host_syncs(monkeypatch):
    for owner, name in SYNCS:
        def raise_sync(*args, _name=name, **kwargs):
            raise HostSync(f"{_name} called inside the decode step")
        monkeypatch.setattr(owner, name, raise_sync)


def _prompts(model_dir: Path, batch: int) -> torch.Tensor:
    """[batch, PROMPT_LEN] windows of the eval text, 100 tokens apart; no pad (0) token, so generate()
    infers an all-ones attention mask."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = tokenizer((EXAMPLES / "eval.txt").read_text()[:4000])["input_ids"]
    ids = torch.tensor([stream[100 * b:100 * b + PROMPT_LEN] for b in range(batch)])
    assert (ids != 0).all()
    return ids


@pytest.fixture(scope="module", params=MODELS)
def named_model(request):
    return request.param, moeq.load(FIXTURES / request.param)  # fp32 on the CPU


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_generate(named_model, batch):
    name, model = named_model
    ids = _prompts(FIXTURES / name, batch)
    ours = greedy_generate(model, ids, NEW_TOKENS, cuda_graph=False)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0)
    assert ours.shape == (batch, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(ours, reference)


def test_one_new_token_is_the_prefill_argmax(named_model):
    name, model = named_model
    ids = _prompts(FIXTURES / name, 2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1].argmax(-1)
    out = greedy_generate(model, ids, 1, cuda_graph=False)
    assert torch.equal(out[:, :PROMPT_LEN], ids) and torch.equal(out[:, PROMPT_LEN], expected)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, ids, 0)


def _prefilled(model, ids, new_tokens):
    """A StaticCache holding the prompt, and the step's static inputs for the first decode step."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)  # [B, 1]
    return cache, token, torch.full_like(token, ids.shape[1])


def _assert_decode_steps_never_sync(model, ids, monkeypatch):
    expected = greedy_generate(model, ids, 4, cuda_graph=False)[:, PROMPT_LEN + 1:]  # [2, 3]
    cache, token, position = _prefilled(model, ids, 4)
    steps = []
    _forbid_host_syncs(monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            steps.append(decode_step(model, cache, token, position))
            token.copy_(steps[-1][:, None])
            position.add_(1)
    monkeypatch.undo()
    assert torch.equal(torch.stack(steps, dim=1), expected)


def test_decode_step_never_syncs_with_the_host(named_model, monkeypatch):
    name, model = named_model
    _assert_decode_steps_never_sync(model, _prompts(FIXTURES / name, 2), monkeypatch)


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_every_family_decodes_like_generate_without_host_syncs(kind, tiny_quantized, monkeypatch):
    """Each family's quantized checkpoint: a host sync in its modules would break the decode step's CUDA-graph
    capture on a GPU."""
    _, out = tiny_quantized(kind)
    model = moeq.load(out)
    ids = _prompts(out, 2)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(greedy_generate(model, ids, NEW_TOKENS, cuda_graph=False), reference)
    _assert_decode_steps_never_sync(model, ids, monkeypatch)


def test_sync_detector_catches_the_eager_expert_loop(monkeypatch):
    model = moeq.load(FIXTURES / "demo-mixtral")
    model.set_experts_implementation("eager")  # transformers' per-expert loop: nonzero() on the routing
    cache, token, position = _prefilled(model, _prompts(FIXTURES / "demo-mixtral", 1), 2)
    _forbid_host_syncs(monkeypatch)
    with torch.no_grad(), pytest.raises(HostSync, match="nonzero"):
        decode_step(model, cache, token, position)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def quantized_demo(tmp_path_factory):
    """demo-mixtral with int4 attention and experts: every layer runs on KernelExperts / KernelLinear on CUDA."""
    return quantize_for_kernels(tmp_path_factory.mktemp("decode") / "q")


@gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_graph_replays_give_the_eager_tokens_gpu(quantized_demo, batch):
    from moeq.runtime import KernelExperts

    model = moeq.load(quantized_demo, "cuda")
    assert all(isinstance(layer.mlp.experts, KernelExperts) for layer in model.model.layers)
    ids = _prompts(FIXTURES / "demo-mixtral", 1).repeat(batch, 1).cuda()
    graph = greedy_generate(model, ids, 32)
    assert torch.equal(graph, greedy_generate(model, ids, 32, cuda_graph=False))


@gpu
@pytest.mark.parametrize("name", MODELS)
def test_graph_replays_give_the_eager_tokens_bf16_gpu(name):
    model = moeq.load(FIXTURES / name, "cuda", kernels=False)  # transformers' grouped_mm experts
    ids = _prompts(FIXTURES / name, 2).cuda()
    assert torch.equal(greedy_generate(model, ids, 32), greedy_generate(model, ids, 32, cuda_graph=False))


@gpu
def test_capture_failure_names_the_cause_gpu():
    model = moeq.load(FIXTURES / "demo-mixtral", "cuda", kernels=False)
    model.set_experts_implementation("eager")
    with pytest.raises(GraphCaptureError, match="capturing the decode step"):
        greedy_generate(model, _prompts(FIXTURES / "demo-mixtral", 1).cuda(), 4)
