"""Paths and builders the tests share. Tests import them from here, never from a conftest.py: every
folder's conftest.py is the module `conftest`, so `from conftest import` finds whichever loaded first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Tiny configs of every supported family, built with transformers' own config classes.
TINY_CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=128),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                      vocab_size=128),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=8, num_experts_per_tok=2, vocab_size=128),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        vocab_size=128),
    "deepseek_v2": dict(model_type="deepseek_v2", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, q_lora_rank=None,
                        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=128),
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=2, eos_token_id=0,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                  vocab_size=128),
}


def make_tiny_checkpoint(kind: str, out: Path, tokenizer_of: Path | None = None) -> Path:
    """Save a randomly initialised model of `kind` with transformers (upstream per-expert naming on disk);
    with tokenizer_of (a model folder), its tokenizer and vocabulary size, so that text can calibrate it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_CONFIGS[kind])
    if tokenizer_of is not None:
        fields["vocab_size"] = json.loads((tokenizer_of / "config.json").read_text())["vocab_size"]
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    if tokenizer_of is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_of / name, out / name)
    return out


# overrides of the mixtral recipe: attention int4 g32 asymmetric, so that one checkpoint holds both int4 kernel
# weight formats (the experts stay int4 g128 symmetric)
ATTENTION_INT4_G32_ASYM = ["rules.0.bits=4", "rules.0.group_size=32", "rules.0.sym=false"]


def quantize_for_kernels(out: Path, overrides: list[str] = ATTENTION_INT4_G32_ASYM,
                         model: Path = EXAMPLES / "demo-mixtral", recipe: str = "mixtral") -> Path:
    """model (the embedded demo-mixtral) quantized into out with a recipe and these overrides (the mixtral recipe
    as shipped has attention int8 per channel); 8 x 64 calibration tokens, on the CPU. Returns out."""
    from moeq.inventory import inventory_from_checkpoint
    from moeq.plan import make_plan
    from moeq.quantize import QuantizeConfig, quantize_model
    from moeq.recipe import load_recipe

    plan = make_plan(inventory_from_checkpoint(model), load_recipe(recipe, overrides))
    quantize_model(plan, QuantizeConfig(calib=EXAMPLES / "calib.txt", out=out, calib_samples=8, seq_len=64,
                                        device="cpu"), log=lambda *a: None)
    return out
