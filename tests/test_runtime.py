"""moeq.load with the Triton kernels swapped in (run by the Triton interpreter on the CPU) matches the
dequantized reference modules; on the GPU where there is one. fp16 activations: the interpreter has no native
bf16 (see tests/triton_kernels/conftest.py). On a GPU, the whole model in bf16 gives the CPU fp32 reference's
perplexity within 0.2%."""

import pytest
import torch
from transformers import AutoTokenizer

import moeq
from moeq.calibration import evaluation_windows, read_token_stream
from moeq.evaluate import model_perplexity
from moeq.loader import StoredCheckpoint
from moeq.runtime import KernelExperts, KernelLinear

from support import ATTENTION_INT4_G32_ASYM, EXAMPLES, FIXTURES, TINY_CONFIGS, quantize_for_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs CPU tensors only in its interpreter


@pytest.fixture(scope="module", params=[ATTENTION_INT4_G32_ASYM, []], ids=["attn-int4-g32", "mixtral-recipe"])
def checkpoint(request, tmp_path_factory):
    """The demo quantized with both int4 formats, or with the mixtral recipe as shipped (attention int8 per
    channel: group_size -1 in the checkpoint)."""
    return quantize_for_kernels(tmp_path_factory.mktemp("rt") / "q", request.param)


@pytest.fixture(scope="module")
def models(checkpoint):
    return (moeq.load(checkpoint, DEVICE, dtype=torch.float16, kernels=False),
            moeq.load(checkpoint, DEVICE, dtype=torch.float16, kernels=True))


def test_kernel_modules_replace_every_quantized_module(models):
    _, kernels = models
    for layer in kernels.model.layers:
        assert isinstance(layer.mlp.experts, KernelExperts)
        attention = (getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert all(isinstance(module, KernelLinear) for module in attention)
        assert not isinstance(layer.mlp.gate, KernelLinear)  # the router stays as stored


def test_kernel_modules_match_the_reference(models):
    reference, kernels = models
    torch.manual_seed(0)
    x = torch.randn(7, 128, dtype=torch.float16).to(DEVICE)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 0], [7, 7], [3, 5]], device=DEVICE)
    weights = torch.rand(7, 2, dtype=torch.float16).to(DEVICE)
    with torch.no_grad():
        for layer_ref, layer_ker in zip(reference.model.layers[:2], kernels.model.layers[:2]):
            for proj in ("q_proj", "o_proj"):
                a = getattr(layer_ref.self_attn, proj)(x).float()
                b = getattr(layer_ker.self_attn, proj)(x).float()
                torch.testing.assert_close(b, a, rtol=0, atol=2e-2 * a.abs().max().item())
            a = layer_ref.mlp.experts(x, ids, weights).float()
            b = layer_ker.mlp.experts(x, ids, weights).float()
            torch.testing.assert_close(b, a, rtol=0, atol=2e-2 * a.abs().max().item())


def test_shared_expert_and_per_channel_int8_run_on_the_kernels(tmp_path):
    """tiny-qwen2-moe with the qwen2_moe recipe as shipped: attention and the shared expert int8 per channel."""
    out = quantize_for_kernels(tmp_path / "q", [], FIXTURES / "tiny-qwen2-moe", "qwen2_moe")
    reference = moeq.load(out, DEVICE, dtype=torch.float16, kernels=False).model.layers[0].mlp
    kernels = moeq.load(out, DEVICE, dtype=torch.float16, kernels=True).model.layers[0].mlp
    assert isinstance(kernels.experts, KernelExperts)
    shared = (getattr(kernels.shared_expert, p) for p in ("gate_proj", "up_proj", "down_proj"))
    assert all(isinstance(module, KernelLinear) for module in shared)
    torch.manual_seed(0)
    x = torch.randn(1, 6, kernels.experts.w13.k, dtype=torch.float16).to(DEVICE)  # [B, T, H]
    with torch.no_grad():
        a, b = reference(x).float(), kernels(x).float()
    torch.testing.assert_close(b, a, rtol=0, atol=2e-2 * a.abs().max().item())


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_every_family_runs_on_the_kernels(kind, tiny_quantized):
    """Every family's checkpoint (its recipe as shipped): each module stored quantized runs on the kernels, and the
    whole model's logits match the reference load."""
    _, out = tiny_quantized(kind)
    reference = moeq.load(out, DEVICE, dtype=torch.float16, kernels=False)
    kernels = moeq.load(out, DEVICE, dtype=torch.float16, kernels=True)
    modules = dict(kernels.named_modules())
    stored = StoredCheckpoint(out)
    linear = {t.module for t in stored.inventory.tensors if stored.schemes[t.name] and t.role != "expert"}
    assert linear and all(isinstance(modules[name], KernelLinear) for name in linear)
    experts = [m for name, m in modules.items() if name.endswith("mlp.experts")]
    assert experts and all(isinstance(m, KernelExperts) for m in experts)
    ids = torch.randint(0, kernels.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        a, b = reference(ids).logits.float(), kernels(ids).logits.float()
    assert ((b - a).norm() / a.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels need a GPU")
def test_gpu_perplexity_matches_the_cpu_reference_gpu(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    windows = evaluation_windows(read_token_stream(EXAMPLES / "eval.txt", tokenizer), 16, 256)  # [16, 256]
    gpu = model_perplexity(moeq.load(checkpoint, "cuda"), windows)  # bf16, kernel-backed modules
    cpu = model_perplexity(moeq.load(checkpoint, "cpu"), windows)  # fp32, dequantized reference
    assert abs(gpu / cpu - 1) < 2e-3, f"GPU perplexity {gpu:.4f} vs CPU reference {cpu:.4f}"
