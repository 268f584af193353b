"""Model families as data: where every tensor of an upstream MoE checkpoint lives and what it is.

One `Family` entry per architecture. A tensor rule is a name template under the decoder layer
(`{e}` = routed-expert index), its role, its projection, its shape as names of model dimensions,
and the kind of layer it appears in. The dimensions come from config.json (through transformers'
config class, so missing keys get the library's defaults); nothing about a model is hard-coded
beyond this table.

Adding a family is one entry. For example OLMoE is:

    Family(
        name="olmoe",
        model_types=("olmoe",),
        dims={"n_experts": "num_experts", "expert_inter": "intermediate_size"},
        layer_tensors=_ATTENTION + _QK_NORM_FULL + _ROUTER + _EXPERTS_GATE_UP_DOWN + _LAYER_NORMS,
    )

plus, where the routed layers are not all layers, a `moe_layer(config, i)` predicate.

Every family's decoder layer in memory (transformers' modules) is pre-norm with attention ending in o_proj:
    residual = x + self_attn(input_layernorm(x)),  out = residual + mlp(post_attention_layernorm(residual)).
moeq.pipeline relies on it to run attention once per layer; a family whose layer differs (parallel
attention and MLP, post-norm, a projection after o_proj) needs its own path there, and
tests/test_pipeline.py::test_layer_shortcut_equals_the_decoder_layer_forward fails for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from moeq.errors import UnsupportedModelError

ROLES = (
    "embed",          # token embedding
    "attn",           # attention projections (incl. DeepSeek MLA low-rank projections) and their biases
    "router",         # the MoE gate choosing experts (and DeepSeek's score-correction bias)
    "router_gate",    # Qwen2-MoE's sigmoid gate on the shared expert
    "expert",         # routed experts
    "shared_expert",  # always-on experts (Qwen2-MoE shared_expert, DeepSeek shared_experts)
    "dense_mlp",      # plain MLPs of non-MoE layers (DeepSeek first_k_dense_replace, Qwen mlp_only_layers)
    "norm",           # RMSNorm weights
    "lm_head",        # output projection
    "mtp",            # DeepSeek-V3 multi-token-prediction layers (past num_hidden_layers): kept as stored
)

@dataclass(frozen=True)
class TensorRule:
    """One tensor of a decoder layer (template relative to `model.layers.{i}.`) or of the model."""

    template: str                  # e.g. "block_sparse_moe.experts.{e}.w1.weight"
    role: str
    proj: str | None               # "gate" | "up" | "down" | "q" | "k" | "v" | "o" | "q_a" | ...
    shape: tuple[str, ...]         # names of dims, e.g. ("expert_inter", "hidden")
    layers: str = "all"            # which decoder layers hold it: "all" | "moe" | "dense"
    when: str | None = None        # a dim that must be truthy for the tensor to exist (e.g. "qkv_bias")


def _rule(template, role, proj, shape, layers="all", when=None):
    return TensorRule(template, role, proj, tuple(shape), layers, when)


_MODEL_TENSORS = (
    _rule("model.embed_tokens.weight", "embed", None, ("vocab", "hidden")),
    _rule("model.norm.weight", "norm", None, ("hidden",)),
    _rule("lm_head.weight", "lm_head", None, ("vocab", "hidden"), when="untied_lm_head"),
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    dims: dict[str, str | Callable]     # dim name -> config attribute, or fn(config) -> int
    layer_tensors: tuple[TensorRule, ...]
    moe_layer: Callable[[object, int], bool] = lambda config, i: True
    extra_layers: str | None = None     # dim counting trailing layers past num_hidden_layers (MTP)
    extra_layer_tensors: tuple[TensorRule, ...] = ()
    # on-disk -> in-memory renames under a decoder layer (transformers' own module names)
    memory_renames: tuple[tuple[str, str], ...] = ()
    model_tensors: tuple[TensorRule, ...] = _MODEL_TENSORS


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# Dims every family has; a family's `dims` adds to or overrides these.
COMMON_DIMS: dict[str, str | Callable] = {
    "hidden": "hidden_size",
    "vocab": "vocab_size",
    "layers": "num_hidden_layers",
    "top_k": "num_experts_per_tok",
    "q_out": lambda c: c.num_attention_heads * _head_dim(c),
    "kv_out": lambda c: (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * _head_dim(c),
    "head_dim": _head_dim,
    "untied_lm_head": lambda c: not getattr(c, "tie_word_embeddings", False),
}


_ATTENTION = (
    _rule("self_attn.q_proj.weight", "attn", "q", ("q_out", "hidden")),
    _rule("self_attn.k_proj.weight", "attn", "k", ("kv_out", "hidden")),
    _rule("self_attn.v_proj.weight", "attn", "v", ("kv_out", "hidden")),
    _rule("self_attn.o_proj.weight", "attn", "o", ("hidden", "q_out")),
)
_QKV_BIAS = (
    _rule("self_attn.q_proj.bias", "attn", "q", ("q_out",), when="qkv_bias"),
    _rule("self_attn.k_proj.bias", "attn", "k", ("kv_out",), when="qkv_bias"),
    _rule("self_attn.v_proj.bias", "attn", "v", ("kv_out",), when="qkv_bias"),
)
_QK_NORM_PER_HEAD = (  # Qwen3: RMSNorm over each head
    _rule("self_attn.q_norm.weight", "norm", None, ("head_dim",)),
    _rule("self_attn.k_norm.weight", "norm", None, ("head_dim",)),
)
_QK_NORM_FULL = (  # OLMoE: RMSNorm over the whole projection
    _rule("self_attn.q_norm.weight", "norm", None, ("q_out",)),
    _rule("self_attn.k_norm.weight", "norm", None, ("kv_out",)),
)
_LAYER_NORMS = (
    _rule("input_layernorm.weight", "norm", None, ("hidden",)),
    _rule("post_attention_layernorm.weight", "norm", None, ("hidden",)),
)
_ROUTER = (_rule("mlp.gate.weight", "router", None, ("n_experts", "hidden"), layers="moe"),)


def _glu(prefix, role, inter, layers, when=None):
    """gate/up/down projections of a SiLU-GLU MLP under `prefix`."""
    return (
        _rule(f"{prefix}.gate_proj.weight", role, "gate", (inter, "hidden"), layers, when),
        _rule(f"{prefix}.up_proj.weight", role, "up", (inter, "hidden"), layers, when),
        _rule(f"{prefix}.down_proj.weight", role, "down", ("hidden", inter), layers, when),
    )


_EXPERTS_GATE_UP_DOWN = _glu("mlp.experts.{e}", "expert", "expert_inter", "moe")
_DENSE_MLP = _glu("mlp", "dense_mlp", "dense_inter", "dense")

_MIXTRAL_LAYER = _ATTENTION + _LAYER_NORMS + (
    _rule("block_sparse_moe.gate.weight", "router", None, ("n_experts", "hidden")),
    # Mixtral keeps w1/w2/w3 on disk (w1 = gate, w3 = up, w2 = down); transformers fuses them in memory.
    _rule("block_sparse_moe.experts.{e}.w1.weight", "expert", "gate", ("expert_inter", "hidden")),
    _rule("block_sparse_moe.experts.{e}.w3.weight", "expert", "up", ("expert_inter", "hidden")),
    _rule("block_sparse_moe.experts.{e}.w2.weight", "expert", "down", ("hidden", "expert_inter")),
)


def _qwen_moe_layer(config, i: int) -> bool:
    """Qwen2/3-MoE: layers listed in mlp_only_layers are dense; otherwise every decoder_sparse_step-th."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only_dense = set(getattr(config, "mlp_only_layers", None) or [])
    return i not in only_dense and config.num_experts > 0 and (i + 1) % step == 0


def _deepseek_moe_layer(config, i: int) -> bool:
    """DeepSeek-V2/V3: the first first_k_dense_replace layers are dense, then every moe_layer_freq-th."""
    freq = getattr(config, "moe_layer_freq", 1) or 1
    return config.n_routed_experts is not None and i >= config.first_k_dense_replace and i % freq == 0


_DEEPSEEK_DIMS: dict[str, str | Callable] = {
    "n_experts": "n_routed_experts",
    "expert_inter": "moe_intermediate_size",
    "dense_inter": "intermediate_size",
    "shared_inter": lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
    "q_lora_rank": lambda c: c.q_lora_rank or 0,
    "no_q_lora": lambda c: not c.q_lora_rank,
    "q_head_out": lambda c: c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim),
    "kv_a_out": lambda c: c.kv_lora_rank + c.qk_rope_head_dim,
    "kv_lora_rank": "kv_lora_rank",
    "kv_b_out": lambda c: c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
    "o_in": lambda c: c.num_attention_heads * c.v_head_dim,
    "score_bias": lambda c: getattr(c, "topk_method", "noaux_tc") == "noaux_tc",
    "mtp_layers": lambda c: getattr(c, "num_nextn_predict_layers", 0) or 0,
}

# DeepSeek multi-head latent attention: low-rank q (unless q_lora_rank is null, as in V2-Lite) and kv.
_MLA = (
    _rule("self_attn.q_proj.weight", "attn", "q", ("q_head_out", "hidden"), when="no_q_lora"),
    _rule("self_attn.q_a_proj.weight", "attn", "q_a", ("q_lora_rank", "hidden"), when="q_lora_rank"),
    _rule("self_attn.q_a_layernorm.weight", "norm", None, ("q_lora_rank",), when="q_lora_rank"),
    _rule("self_attn.q_b_proj.weight", "attn", "q_b", ("q_head_out", "q_lora_rank"), when="q_lora_rank"),
    _rule("self_attn.kv_a_proj_with_mqa.weight", "attn", "kv_a", ("kv_a_out", "hidden")),
    _rule("self_attn.kv_a_layernorm.weight", "norm", None, ("kv_lora_rank",)),
    _rule("self_attn.kv_b_proj.weight", "attn", "kv_b", ("kv_b_out", "kv_lora_rank")),
    _rule("self_attn.o_proj.weight", "attn", "o", ("hidden", "o_in")),
)
_DEEPSEEK_LAYER = (
    _MLA + _LAYER_NORMS + _ROUTER + _EXPERTS_GATE_UP_DOWN + _DENSE_MLP
    + _glu("mlp.shared_experts", "shared_expert", "shared_inter", "moe", when="shared_inter")
    + (_rule("mlp.gate.e_score_correction_bias", "router", None, ("n_experts",), "moe", "score_bias"),)
)
# A DeepSeek-V3 MTP layer is a full MoE decoder layer plus these; transformers ignores it on load, and
# the inventory gives all of its tensors the role "mtp".
_DEEPSEEK_MTP = _DEEPSEEK_LAYER + (
    _rule("enorm.weight", "mtp", None, ("hidden",)),
    _rule("hnorm.weight", "mtp", None, ("hidden",)),
    _rule("eh_proj.weight", "mtp", None, ("hidden", "hidden2")),
    _rule("embed_tokens.weight", "mtp", None, ("vocab", "hidden")),
    _rule("shared_head.norm.weight", "mtp", None, ("hidden",)),
    _rule("shared_head.head.weight", "mtp", None, ("vocab", "hidden")),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="mixtral",
        model_types=("mixtral",),
        dims={"n_experts": "num_local_experts", "expert_inter": "intermediate_size"},
        layer_tensors=_MIXTRAL_LAYER,
        memory_renames=(("block_sparse_moe.", "mlp."),),
    ),
    Family(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        dims={
            "n_experts": "num_experts",
            "expert_inter": "moe_intermediate_size",
            "shared_inter": "shared_expert_intermediate_size",
            "dense_inter": "intermediate_size",
            "qkv_bias": lambda c: getattr(c, "qkv_bias", True),
        },
        layer_tensors=_ATTENTION + _QKV_BIAS + _LAYER_NORMS + _ROUTER + _EXPERTS_GATE_UP_DOWN + _DENSE_MLP
        + _glu("mlp.shared_expert", "shared_expert", "shared_inter", "moe", when="shared_inter")
        + (_rule("mlp.shared_expert_gate.weight", "router_gate", None, ("one", "hidden"), "moe", "shared_inter"),),
        moe_layer=_qwen_moe_layer,
    ),
    Family(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        dims={
            "n_experts": "num_experts",
            "expert_inter": "moe_intermediate_size",
            "dense_inter": "intermediate_size",
            "qkv_bias": lambda c: getattr(c, "attention_bias", False),
        },
        layer_tensors=_ATTENTION + _QKV_BIAS + _QK_NORM_PER_HEAD + _LAYER_NORMS + _ROUTER
        + _EXPERTS_GATE_UP_DOWN + _DENSE_MLP,
        moe_layer=_qwen_moe_layer,
    ),
    Family(
        name="deepseek",
        model_types=("deepseek_v2", "deepseek_v3"),
        dims=_DEEPSEEK_DIMS,
        layer_tensors=_DEEPSEEK_LAYER,
        moe_layer=_deepseek_moe_layer,
        extra_layers="mtp_layers",
        extra_layer_tensors=_DEEPSEEK_MTP,
    ),
    Family(
        name="olmoe",
        model_types=("olmoe",),
        dims={"n_experts": "num_experts", "expert_inter": "intermediate_size"},
        layer_tensors=_ATTENTION + _QK_NORM_FULL + _ROUTER + _EXPERTS_GATE_UP_DOWN + _LAYER_NORMS,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    """The family entry for a config.json `model_type`, or a clear error naming what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported MoE family. Supported: "
        f"{', '.join(supported_model_types())}. To add one, add a Family entry to FAMILIES in "
        f"moeq/families.py (tensor templates, roles and dims from config.json)."
    )


def model_dims(family: Family, config) -> dict[str, int]:
    """Resolve every dim of `family` (common ones included) from a transformers config object."""
    dims: dict[str, int] = {"one": 1, "hidden2": 2 * config.hidden_size}
    for name, source in {**COMMON_DIMS, **family.dims}.items():
        dims[name] = source(config) if callable(source) else getattr(config, source)
    return dims
