import pytest
import torch

from moeq.calibration import calibration_windows
from moeq.hessian import RoutedHessian, Scratch
from moeq.inventory import inventory_from_checkpoint
from moeq import pipeline
from moeq.pipeline import (ATTENTION_OUTPUT, INPUT_STAGE, MLP_BLOCK, ModuleResult, _expert_intermediate,
                           _experts_output, _tensor_stage, build_skeleton, capture_inputs, capture_layer_inputs,
                           layer_outputs, load_model_tensor, quantize_layer, routed_pairs, run_layer, split_at_mlp)
from moeq.plan import make_plan
from moeq.quant_format import QuantFormat, rtn
from moeq.recipe import load_recipe
from moeq.shards import ShardReader, weight_slot

from support import DATA, FIXTURES, TINY_CONFIGS


def _resident_layer(model_dir, recipe, overrides=(), layer_index=0, tokens=(16, 128), seed=0):
    inventory = inventory_from_checkpoint(model_dir)
    plan = make_plan(inventory, load_recipe(recipe, list(overrides)))
    reader = ShardReader(inventory)
    model = build_skeleton(inventory.config, torch.device("cpu"), torch.float32)
    load_model_tensor(model, reader, plan, "model.embed_tokens.weight", "cpu", torch.float32)
    if (model_dir / "tokenizer.json").is_file():  # real text for the trained fixtures
        from transformers import AutoTokenizer

        text = (DATA / "calib.txt").read_text()[:200_000]
        stream = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])
        ids = calibration_windows(stream, tokens[0], tokens[1], seed)
    else:
        ids = torch.randint(0, inventory.config.vocab_size, tokens, generator=torch.Generator().manual_seed(seed))
    acts = capture_layer_inputs(model, list(ids.split(8)), "cpu")
    layer = model.model.layers[layer_index]
    layer.load_state_dict({k: v.float() for k, v in reader.layer_state(layer_index).items()}, assign=True)
    layer.requires_grad_(False)
    return plan, layer, acts, reader


def _by_name(results: list[ModuleResult]) -> dict[str, ModuleResult]:
    return {r.name: r for r in results}


def test_expert_hessians_count_exactly_the_routed_tokens():
    plan, layer, acts, _ = _resident_layer(FIXTURES / "demo-mixtral", "mixtral")
    results = _by_name(quantize_layer(layer, 0, [e for e in plan.entries if e.tensor.layer == 0], plan, acts)[0])
    # routing recomputed independently from the (quantized-attention) MoE inputs and the kept router
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in capture_inputs(layer, MLP_BLOCK, acts)])
    top2 = torch.topk(torch.softmax(x @ layer.mlp.gate.weight.T, dim=-1), 2, dim=-1).indices
    counts = torch.bincount(top2.reshape(-1), minlength=8)
    for e in range(8):
        for w in ("w1", "w2", "w3"):
            assert results[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"].tokens == counts[e]
    assert counts.sum() == 2 * 16 * 128


def test_gptq_beats_rtn_on_every_expert_projection():
    plan, layer, acts, reader = _resident_layer(FIXTURES / "demo-mixtral", "mixtral", ["defaults.min_tokens=0",
                                                                              "defaults.gate_weighted=false"])
    results, _ = quantize_layer(layer, 0, [e for e in plan.entries if e.tensor.layer == 0], plan, acts)
    for r in results:
        assert r.method == "gptq" and r.loss > 0 and torch.isfinite(torch.tensor(r.loss))
    experts = [r for r in results if r.role == "expert" and r.tokens > 200]
    assert len(experts) >= 12
    # RTN loss for the same weights under the same (post-attention) statistics is larger for each projection
    mlp_x = torch.cat([h.reshape(-1, h.shape[-1]) for h in capture_inputs(layer, MLP_BLOCK, acts)])
    for r in experts:
        if r.name.endswith("w2.weight"):
            continue
        tokens = (torch.topk(torch.softmax(mlp_x @ layer.mlp.gate.weight.T, -1), 2, -1).indices == r.expert).any(-1)
        xe = mlp_x[tokens]
        h = xe.T @ xe / xe.shape[0]
        w = reader.read(plan.inventory.by_name[r.name]).float()
        rtn_dq = rtn(w, QuantFormat(4, 128, True)).dequantize()
        rtn_loss = float(torch.einsum("nk,kj,nj->", rtn_dq - w, h, rtn_dq - w) / w.shape[0])
        assert r.loss < rtn_loss, r.name


def test_expert_with_zero_tokens_is_reported_and_keeps_its_weights(tiny_checkpoints):
    plan, layer, acts, reader = _resident_layer(tiny_checkpoints["mixtral"], "mixtral",
                                                ["defaults.group_size=32"], tokens=(8, 32))
    router = layer.mlp.gate

    def never_expert_3(hidden):  # Mixtral's softmax top-2 with expert 3 masked out
        logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), router.weight)
        logits[:, 3] = -torch.inf
        top = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
        return logits, top.values / top.values.sum(-1, keepdim=True), top.indices

    router.forward = never_expert_3
    results = _by_name(quantize_layer(layer, 0, [e for e in plan.entries if e.tensor.layer == 0], plan, acts)[0])
    for w in ("w1", "w2", "w3"):
        name = f"model.layers.0.block_sparse_moe.experts.3.{w}.weight"
        r = results[name]
        assert r.tokens == 0 and r.fallback == "shrink"
        original = reader.read(plan.inventory.by_name[name]).float()
        dq = r.quantized.dequantize()
        assert torch.isfinite(dq).all() and (dq != 0).float().mean() > 0.5
        # solved against the layer-average Hessian: close to the original, never destroyed
        assert (dq - original).norm() / original.norm() < 0.25
        assert torch.equal(weight_slot(plan.inventory.by_name[name], plan.inventory).get(layer), dq)


def test_rtn_policy_for_starved_experts(tiny_checkpoints):
    plan, layer, acts, _ = _resident_layer(tiny_checkpoints["mixtral"], "mixtral",
                                           ["defaults.group_size=32", "defaults.starved=rtn",
                                            "defaults.min_tokens=100000"], tokens=(8, 32))
    results, _ = quantize_layer(layer, 0, [e for e in plan.entries if e.tensor.layer == 0], plan, acts)
    experts = [r for r in results if r.role == "expert"]
    assert experts and all(r.method == "rtn" and r.fallback == "rtn" for r in experts)
    assert all(r.method == "gptq" for r in results if r.role == "attn")


def test_expert_intermediate_matches_the_experts_forward():
    plan, layer, acts, _ = _resident_layer(FIXTURES / "demo-mixtral", "mixtral")
    experts = layer.mlp.experts
    x = torch.randn(10, 128)
    tokens = torch.tensor([7, 0, 9, 0, 3])           # grouped by expert: 0 | 1, 1 | 5, 5
    ids = torch.tensor([0, 1, 1, 5, 5])
    inter = _expert_intermediate(experts, x, tokens, torch.bincount(ids, minlength=8), torch.empty(5, 256),
                                 Scratch())
    for p in range(5):
        gate, up = (x[tokens[p]] @ experts.gate_up_proj[ids[p]].T).chunk(2)
        torch.testing.assert_close(inter[p], torch.nn.functional.silu(gate) * up)


def test_hessian_accumulator_is_the_routed_one():
    h = RoutedHessian(4, 3)
    x = torch.eye(3)
    h.add(x, torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0]))
    assert h.counts.tolist() == [1, 0, 2, 0]


def test_router_int8_when_the_recipe_asks():
    plan, layer, acts, reader = _resident_layer(FIXTURES / "demo-mixtral", "mixtral",
                                                ["rules.2.bits=8", "rules.2.group_size=-1"], tokens=(8, 128))
    original = layer.mlp.gate.weight.clone()
    results = _by_name(quantize_layer(layer, 0, [e for e in plan.entries if e.tensor.layer == 0], plan, acts)[0])
    router = results["model.layers.0.block_sparse_moe.gate.weight"]
    assert router.method == "gptq" and router.quantized.fmt.bits == 8 and router.tokens == 8 * 128
    assert torch.equal(layer.mlp.gate.weight, router.quantized.dequantize())  # the experts saw this router
    assert 0 < (layer.mlp.gate.weight - original).abs().max() <= router.quantized.scales.float().max()


def _input_stage_modules(plan, layer_index: int) -> list[str]:
    entries = [e for e in plan.entries if e.tensor.layer == layer_index and e.tensor.role == "attn"]
    return sorted({weight_slot(e.tensor, plan.inventory).module_path() for e in entries
                   if _tensor_stage(e) == INPUT_STAGE})


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_layer_shortcut_equals_the_decoder_layer_forward(tiny_checkpoints, kind):
    # quantize_layer relies on every family's layer being pre-norm with attention ending in o_proj:
    # out = r + mlp(post_attention_layernorm(r)), r = x + o_proj(o_proj's input), and on the input stage's
    # projections reading input_layernorm(x). Checked bit for bit on every layer (dense and MoE ones alike).
    model_dir = tiny_checkpoints[kind]
    num_layers = TINY_CONFIGS[kind]["num_hidden_layers"]
    for i in range(num_layers):
        plan, layer, acts, _ = _resident_layer(model_dir, "uniform-int4", ["defaults.group_size=-1"], i,
                                               tokens=(4, 32))
        normed = layer.input_layernorm(acts.batches[0])
        paths = _input_stage_modules(plan, i)
        assert len(paths) >= 2, paths
        for path in paths:
            assert torch.equal(capture_inputs(layer, path, acts)[0], normed), f"{kind} layer {i} {path}"
        mlp_inputs = split_at_mlp(layer, acts, capture_inputs(layer, ATTENTION_OUTPUT, acts))
        assert all(torch.equal(a, b) for a, b in zip(mlp_inputs.normed, capture_inputs(layer, MLP_BLOCK, acts)))
        full = run_layer(layer, acts).batches
        shortcut = layer_outputs(layer, mlp_inputs, acts.kwargs).batches
        assert len(full) == len(shortcut) == 1
        assert all(torch.equal(a, b) for a, b in zip(full, shortcut)), f"{kind} layer {i}"


def test_quantize_layer_outputs_are_the_quantized_layers_forward(tiny_checkpoints, monkeypatch):
    # The output pass reuses the down stage's intermediates, or recomputes those over the memory budget:
    # both give the same bits, and the quantized layer's forward (transformers' grouped experts) up to rounding.
    calls = []
    intermediate = pipeline._expert_intermediate
    monkeypatch.setattr(pipeline, "_expert_intermediate", lambda *a: calls.append(1) or intermediate(*a))
    outputs = {}
    for budget in (None, 0):
        if budget is not None:
            monkeypatch.setattr(pipeline, "intermediate_budget", lambda layer: budget)
        calls.clear()
        plan, layer, acts, _ = _resident_layer(tiny_checkpoints["qwen2_moe"], "qwen2_moe",
                                               ["defaults.group_size=32"], tokens=(16, 32))
        results, out = quantize_layer(layer, 0, [e for e in plan.entries if e.tensor.layer == 0], plan, acts)
        assert {r.role for r in results} >= {"attn", "expert", "shared_expert"}
        assert len(out.batches) == len(acts.batches) == 2
        assert len(calls) == len(acts.batches) * (1 if budget is None else 2)  # kept: gate/up run once
        for a, b in zip(out.batches, run_layer(layer, acts).batches):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        outputs[budget] = out.batches
    assert all(torch.equal(a, b) for a, b in zip(outputs[None], outputs[0]))


def test_experts_output_matches_the_experts_forward():
    plan, layer, acts, _ = _resident_layer(FIXTURES / "demo-mixtral", "mixtral")
    experts = layer.mlp.experts
    x = torch.randn(6, 128)
    top_k_index = torch.tensor([[0, 3], [3, 5], [1, 0], [5, 3], [0, 1], [7, 2]])
    top_k_weights = torch.rand(6, 2)
    pairs = routed_pairs(top_k_index, top_k_weights, 8)
    assert pairs.tokens.tolist() == [0, 2, 4, 2, 4, 5, 0, 1, 3, 1, 3, 5]  # experts 0 | 1 | 2 | 3 | 5 | 7
    inter = _expert_intermediate(experts, x, pairs.tokens, pairs.counts, torch.empty(12, 256), Scratch())
    out = _experts_output(experts, x, pairs, inter, torch.empty(12, 128))
    torch.testing.assert_close(out, experts(x, top_k_index, top_k_weights))
