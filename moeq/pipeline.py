"""Sequential quantization: one decoder layer resident at a time, streamed from the safetensors shards.

For each layer: load its tensors from disk, run the calibration activations through it with hooks
stage by stage (true-sequential: attention q/k/v, then MLA's q_b/kv_b, then o; then routers, gate/up of
routed experts, shared experts and dense MLPs; then down projections), solve each stage with GPTQ and
write the dequantized weights back so the next stage sees the quantized outputs, then pass the
quantized layer's outputs on as the next layer's inputs. Attention runs once per layer: every supported
family's decoder layer is pre-norm and its attention ends in o_proj, so the MLP block's inputs and the
layer's outputs follow from o_proj's inputs. Routed experts' statistics come from the
(hidden, top_k_index, top_k_weights) that the model's own router hands its experts module, so every
family's routing rule (softmax top-k, Qwen's norm_topk_prob, DeepSeek's grouped sigmoid with the
correction bias) is the model's own. One function serves every family; no tracing.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from moeq.errors import MoeqError
from moeq.gptq import GPTQResult, gptq_quantize, row_errors
from moeq.hessian import RoutedHessian, Scratch, group_by_expert
from moeq.plan import Plan, TensorPlan
from moeq.quant_format import QuantizedTensor, rtn
from moeq.shards import ShardReader, weight_slot

# True-sequential stages within a decoder layer: (roles, projections). A tensor is solved in the first
# stage that names its role and projection; its inputs are collected after all earlier stages are applied.
STAGES: tuple[tuple[frozenset, frozenset], ...] = (
    (frozenset({"attn"}), frozenset({"q", "k", "v", "q_a", "kv_a"})),
    (frozenset({"attn"}), frozenset({"q_b", "kv_b"})),
    (frozenset({"attn"}), frozenset({"o"})),
    (frozenset({"router", "router_gate", "expert", "shared_expert", "dense_mlp"}), frozenset({"gate", "up", None})),
    (frozenset({"expert", "shared_expert", "dense_mlp"}), frozenset({"down"})),
)
INPUT_STAGE, O_STAGE, FIRST_MLP_STAGE, DOWN_STAGE = 0, 2, 3, 4
# transformers' modules of a decoder layer, the same in every supported family. The layer is pre-norm:
#     residual = x + self_attn(input_layernorm(x))      self_attn's last op is o_proj
#     out      = residual + mlp(post_attention_layernorm(residual))
# and the input stage's projections (q, k, v; MLA's q_a, kv_a) all read input_layernorm(x)
# (tests/test_pipeline.py checks these shortcuts against the layer's forward for every family).
INPUT_NORM = "input_layernorm"
ATTENTION_OUTPUT = "self_attn.o_proj"
POST_ATTENTION_NORM = "post_attention_layernorm"
MLP_BLOCK = "mlp"  # the MoE block or dense MLP


@dataclass(frozen=True)
class ModuleResult:
    """What happened to one quantized tensor."""

    name: str
    role: str
    layer: int | None
    expert: int | None
    method: str            # "gptq" | "rtn"
    tokens: int            # calibration tokens that reached it (routed tokens for experts)
    loss: float            # tr(dW H dW^T) / N: mean squared output error per output element
    rel_loss: float        # the same relative to the output's energy tr(W H W^T) / N
    damp: float            # relative damping used (raised when the Hessian was not positive definite)
    fallback: str | None   # starved-expert policy applied: "shrink" | "rtn" | None
    quantized: QuantizedTensor | None = field(repr=False, compare=False)  # None once written (numbers_only)

    def numbers_only(self) -> ModuleResult:
        """This result without its quantized tensors, for reports kept after the tensors are written."""
        return replace(self, quantized=None)


@dataclass(frozen=True)
class LayerActivations:
    """Hidden states entering a decoder layer, as a list of batches, and the kwargs the layer takes."""

    batches: list[torch.Tensor]                   # each [B, L, H]
    kwargs: list[dict]                            # per batch: attention mask, position embeddings, ...


@dataclass(frozen=True)
class MlpInputs:
    """A decoder layer's state at its MLP block, per batch: the layer's output is residual + mlp(normed)."""

    residual: list[torch.Tensor]                  # each [B, L, H]: x + self_attn(input_layernorm(x))
    normed: list[torch.Tensor]                    # each [B, L, H]: post_attention_layernorm(residual)


@dataclass(frozen=True)
class RoutedPairs:
    """One batch's (token, expert) routing pairs, grouped by expert (each expert's pairs in token order)."""

    flat: torch.Tensor     # [P] index t * k + j of each pair in top_k_index.reshape(-1)
    tokens: torch.Tensor   # [P] the pair's token t
    counts: torch.Tensor   # [E] pairs per expert
    weights: torch.Tensor  # [P] the pair's routing weight
    top_k: int


def routed_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> RoutedPairs:
    """top_k_index, top_k_weights [T, k] as the experts module receives them -> RoutedPairs."""
    experts = top_k_index.reshape(-1)
    keep = experts < num_experts  # index == E marks a dropped pair (expert parallelism)
    order, counts = group_by_expert(experts[keep], num_experts)
    flat = torch.arange(experts.numel(), device=experts.device)[keep][order]
    k = top_k_index.shape[1]
    return RoutedPairs(flat, flat // k, counts, top_k_weights.reshape(-1)[flat], k)


def _experts_args(args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) from an experts module call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    return tuple((list(args) + [kwargs[n] for n in names[len(args):]])[:3])


class _StageDone(Exception):
    """Raised by a hook once every input site of a stage has been seen: the rest of the forward is skipped."""


def _tensor_stage(plan_entry: TensorPlan) -> int:
    t = plan_entry.tensor
    for i, (roles, projs) in enumerate(STAGES):
        if t.role in roles and t.proj in projs:
            return i
    raise MoeqError(f"{t.name}: no quantization stage for role {t.role!r} proj {t.proj!r}; add it to STAGES")


def compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPUs (their bf16 matmuls are ~100x slower), bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def build_skeleton(config, device: torch.device, dtype: torch.dtype, use_cache: bool = False):
    """The model with every parameter on the meta device except embeddings and rotary tables. use_cache:
    whether its forward and generate() keep a KV cache by default (calibration has no use for one)."""
    from transformers import AutoModelForCausalLM

    config = copy.copy(config)  # the inventory's config stays as read
    config.use_cache = use_cache
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config).to(device)  # rebuilt: meta buffers hold no values
    return model.eval()


def load_layer(model, reader: ShardReader, i: int, device, dtype) -> torch.nn.Module:
    """Materialise decoder layer i from disk into the skeleton: 16-bit weights in the compute dtype,
    fp32 tensors (DeepSeek's routing bias) kept fp32; no gradients."""
    layer = model.model.layers[i]
    layer.load_state_dict({k: v.to(device, dtype if v.dtype in (torch.bfloat16, torch.float16) else v.dtype)
                           for k, v in reader.layer_state(i).items()}, assign=True)
    return layer.requires_grad_(False)


def load_model_tensor(model, reader: ShardReader, plan: Plan, name: str, device, dtype) -> None:
    """Materialise one model-level tensor (embed, final norm, lm_head) from disk into the skeleton."""
    tensor = plan.inventory.by_name[name]
    module_path, param = name.rsplit(".", 1)
    module = model.get_submodule(module_path)
    setattr(module, param, torch.nn.Parameter(reader.read(tensor).to(device, dtype), requires_grad=False))


def capture_layer_inputs(model, token_batches: list[torch.Tensor], device) -> LayerActivations:
    """Run the embedding and capture what the first decoder layer receives for each batch."""
    captured: list = []

    class Catcher(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer
            self.attention_type = getattr(layer, "attention_type", "full_attention")

        def forward(self, hidden_states, *args, **kwargs):
            captured.append((hidden_states, kwargs))
            raise _StageDone

    first = model.model.layers[0]
    model.model.layers[0] = Catcher(first)
    try:
        for ids in token_batches:
            try:
                model.model(input_ids=ids.to(device), use_cache=False)
            except _StageDone:
                pass
    finally:
        model.model.layers[0] = first
    return LayerActivations([h for h, _ in captured], [kw for _, kw in captured])


def run_layer(layer, acts: LayerActivations) -> LayerActivations:
    """The layer's outputs for every batch (the next layer's inputs)."""
    outputs = []
    with torch.no_grad():
        for hidden, kwargs in zip(acts.batches, acts.kwargs):
            out = layer(hidden, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return LayerActivations(outputs, acts.kwargs)


@dataclass(frozen=True)
class KeptIntermediate:
    """The down stage's input for one batch, for the layer's output pass."""

    counts: torch.Tensor              # [E] pairs per expert, to check the output pass routes the same
    values: torch.Tensor | None       # [P, I] grouped by expert; None when not kept (recomputed)


def intermediate_budget(layer) -> int:
    """Bytes of down-stage inputs kept for the output pass, which then skips recomputing gate/up. On a CPU,
    where those GEMMs are a fifth of a layer's time, half the available memory. On an accelerator none:
    there gate/up is ~10% of a layer's time and keeping it would add [P, I] to the peak (15 GB on
    Mixtral-8x7B's 47 GB at 128 x 2048 tokens: measured 64.8 GiB on an H100)."""
    if next(layer.parameters()).device.type != "cpu":
        return 0
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # no such sysconf name on this platform: recompute
        return 0


class _Sites:
    """Forward pre-hooks that accumulate the Hessians of one stage of one layer.

    Linear-like modules (attention projections, routers, shared-expert and dense-MLP projections) see
    their input. Modules fed the very same input tensor in a batch (q/k/v; a router and a shared expert)
    share one accumulator. Routed experts: the experts module's (hidden, top_k_index, top_k_weights);
    gate/up accumulate the routed hidden states, down the intermediate activations computed with the
    (already quantized) gate/up weights. Once every site has fired in a batch the forward is cut short.
    """

    def __init__(self, layer, linear_modules: list[str], experts_module: str | None, experts_input: str,
                 num_experts: int, gate_weighted: bool):
        self.layer = layer
        self.linear_modules = linear_modules
        self.experts_module, self.experts_input = experts_module, experts_input
        self.num_experts, self.gate_weighted = num_experts, gate_weighted
        self.hessians: dict[str, RoutedHessian] = {}   # accumulator key -> Hessian
        self.owner: dict[str, str] = {}                # module -> accumulator key (shared inputs)
        self._inputs: dict[str, torch.Tensor] = {}     # this batch's input per linear module
        self._experts_seen = False
        self._intermediate = Scratch()                 # the down stage's [P, I] of a batch not kept
        self._gate_up = Scratch()                      # and its per-expert work space
        self.intermediates: list[KeptIntermediate] = []  # the down stage's, per batch
        self.keep_budget = intermediate_budget(layer) if experts_input == "down" else 0
        self.kept_bytes = 0
        self._handles = []

    def __enter__(self):
        for path in self.linear_modules:
            hook = self._linear_hook(path)
            self._handles.append(self.layer.get_submodule(path).register_forward_pre_hook(hook))
        if self.experts_module:
            module = self.layer.get_submodule(self.experts_module)
            self._handles.append(module.register_forward_pre_hook(self._experts_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def run(self, forward) -> None:
        """One batch: run `forward`, cut short once every site has fired, then accumulate."""
        try:
            forward()
        except _StageDone:
            pass
        missing = [p for p in self.linear_modules if p not in self._inputs]
        if missing or (self.experts_module and not self._experts_seen):
            raise MoeqError(f"modules {missing or [self.experts_module]} received no input in the layer's forward; "
                            "the family table names a module this model does not run")
        seen: dict[int, str] = {}
        for path in self.linear_modules:
            x = self._inputs[path]
            key = self.owner.setdefault(path, seen.setdefault(id(x), path))
            if key == path:
                flat = x.reshape(-1, x.shape[-1])
                self._accumulate(path, flat, torch.tensor([flat.shape[0]]), None)
        self._inputs.clear()
        self._experts_seen = False

    def feed(self, x: torch.Tensor) -> None:
        """Hand x to every linear site, as a forward does whose sites all read the same tensor."""
        for path in self.linear_modules:
            self._inputs[path] = x

    def _check_done(self):
        if len(self._inputs) == len(self.linear_modules) and (self._experts_seen or not self.experts_module):
            raise _StageDone

    def _linear_hook(self, path):
        def hook(module, args):
            self._inputs[path] = args[0]
            self._check_done()
        return hook

    def _experts_hook(self, module, args, kwargs):
        hidden, top_k_index, top_k_weights = _experts_args(args, kwargs)
        pairs = routed_pairs(top_k_index, top_k_weights, self.num_experts)
        # The MoE output is sum_k w_k * expert_k(x): an expert's output error reaches the block scaled by its
        # gate weight, so gate weighting (AGQ) weights each pair's x x^T by w^2.
        weights = pairs.weights.float() ** 2 if self.gate_weighted else None
        if self.experts_input == "down":
            xs = self._intermediate_for(module, hidden, pairs)
        else:
            xs = hidden[pairs.tokens]
        self._accumulate(self.experts_module, xs, pairs.counts, weights)
        self._experts_seen = True
        self._check_done()

    def _intermediate_for(self, module, hidden, pairs: RoutedPairs) -> torch.Tensor:
        """The down stage's input [P, I] for one batch, kept for the layer's output pass while the kept
        ones fit the budget (else computed into the reused buffer, and again by that pass)."""
        shape = (pairs.tokens.numel(), module.down_proj.shape[-1])
        nbytes = shape[0] * shape[1] * hidden.element_size()
        keep = self.kept_bytes + nbytes <= self.keep_budget
        out = (torch.empty(shape, dtype=hidden.dtype, device=hidden.device) if keep
               else self._intermediate.take(shape, hidden.dtype, hidden.device))
        xs = _expert_intermediate(module, hidden, pairs.tokens, pairs.counts, out, self._gate_up)
        self.intermediates.append(KeptIntermediate(pairs.counts, xs if keep else None))
        self.kept_bytes += nbytes if keep else 0
        return xs

    def _accumulate(self, key, xs, counts, weights):
        """xs [P, K] grouped by expert, counts [E] (E = 1 for a linear module), weights [P] or None."""
        if key not in self.hessians:
            self.hessians[key] = RoutedHessian(counts.numel(), xs.shape[-1], device=xs.device)
        self.hessians[key].add_grouped(xs, counts, weights)

    def hessian_for(self, module_path: str) -> RoutedHessian:
        return self.hessians[self.owner.get(module_path, module_path)]


def _expert_intermediate(module, hidden, tokens, counts, out: torch.Tensor, work: Scratch) -> torch.Tensor:
    """act(x W_gate^T) * (x W_up^T) for routing pairs grouped by expert (tokens [P]: expert 0's counts[0]
    tokens, then expert 1's, ...), written in the same order into out [P, I], which is returned. Each
    expert's gathered rows [n, H] and gate/up product [n, 2I] go into `work`, reused across calls."""
    H, two_i = hidden.shape[1], module.gate_up_proj.shape[1]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            flat = work.take((n * (H + two_i),), hidden.dtype, hidden.device)
            x = torch.index_select(hidden, 0, tokens[rows], out=flat[:n * H].view(n, H))
            gate, up = torch.mm(x, module.gate_up_proj[e].T, out=flat[n * H:].view(n, two_i)).chunk(2, dim=-1)
            torch.mul(module.act_fn(gate), up, out=out[rows])
            start += n
    return out


def _experts_output(module, hidden, pairs: RoutedPairs, intermediate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The experts module's output [T, H] from the pairs' intermediates [P, I] (see _expert_intermediate):
    per token, the sum over its top-k pairs of weight * down_e(intermediate), reduced as transformers'
    experts forward reduces it (weights in their own dtype, then a sum over k). out [P, H]: scratch."""
    start = 0
    for e, n in enumerate(pairs.counts.tolist()):
        if n:
            rows = slice(start, start + n)
            torch.mm(intermediate[rows], module.down_proj[e].T, out=out[rows])
            start += n
    weighted = out * pairs.weights[:, None]
    per_slot = weighted.new_zeros(hidden.shape[0] * pairs.top_k, hidden.shape[1])  # [T * k, H]; dropped pairs 0
    per_slot[pairs.flat] = weighted
    return per_slot.view(hidden.shape[0], pairs.top_k, -1).sum(dim=1).to(hidden.dtype)


def _solve(weights: list[torch.Tensor], hessian: torch.Tensor, scheme) -> list[tuple[QuantizedTensor, dict]]:
    """GPTQ or RTN for weights W_i [E, N_i, K] that share the Hessians H [E, K, K] and `scheme` (q/k/v of one
    input; an expert's gate and up): one solve over their rows stacked along N (rows are solved independently
    given H), split back. Returns (quantized, stats) per weight."""
    fmt = scheme.format
    w = weights[0].float() if len(weights) == 1 else torch.cat([x.float() for x in weights], dim=1)
    if scheme.method == "gptq":
        result = gptq_quantize(w, hessian, fmt, act_order=scheme.act_order, damp=scheme.damp)
    else:
        q = rtn(w, fmt)
        none = torch.zeros(w.shape[0], dtype=torch.long)
        result = GPTQResult(q.q, q.scales, q.zeros, *row_errors(w, q.dequantize(), hessian), damp=none.float(),
                            dead_columns=none, fmt=fmt)
    parts, start = [], 0
    for x in weights:
        part = result.rows(slice(start, start + x.shape[1]))
        start += x.shape[1]
        parts.append((part.quantized, {"loss": part.loss, "rel_loss": part.rel_loss, "damp": part.damp}))
    return parts


def quantize_layer(layer, layer_index: int, entries: list[TensorPlan], plan: Plan, acts: LayerActivations,
                   on_stage: Callable[[str], None] = lambda s: None) -> tuple[list[ModuleResult], LayerActivations]:
    """Quantize one resident decoder layer in place, stage by stage; returns a result per quantized tensor
    and the quantized layer's outputs for `acts` (the next layer's inputs).

    The input stage's projections read input_layernorm(x); MLA's q_b/kv_b stage runs the layer's forward,
    cut short at its modules. Attention then runs once, cut short at o_proj; the o stage runs o_proj on
    those inputs, and the MLP stages and the outputs run only the MLP block on its inputs
    (residual + o_proj, normed), computed once o is quantized. The output pass takes the routed experts'
    act(gate) * up from the down stage, which computed them with the quantized gate/up (kept on a CPU
    while they fit in half the free memory, else recomputed the same way, bit for bit).
    """
    inventory = plan.inventory
    by_stage: dict[int, list[TensorPlan]] = {}
    for entry in entries:
        if entry.scheme is not None:
            by_stage.setdefault(_tensor_stage(entry), []).append(entry)
    results: list[ModuleResult] = []
    o_inputs: list[torch.Tensor] | None = None
    mlp_inputs: MlpInputs | None = None
    kept = None  # (experts module, the down stage's intermediates) for the output pass
    for stage in sorted(by_stage):
        stage_entries = by_stage[stage]
        slots = {e.tensor.name: weight_slot(e.tensor, inventory) for e in stage_entries}
        experts = [e for e in stage_entries if e.tensor.role == "expert"]
        linear = sorted({slots[e.tensor.name].module_path() for e in stage_entries if e.tensor.role != "expert"})
        sites = _Sites(layer, linear, slots[experts[0].tensor.name].module_path() if experts else None,
                       "down" if stage == DOWN_STAGE else "in", inventory.num_experts,
                       any(e.scheme.gate_weighted for e in experts))
        on_stage(f"layer {layer_index} stage {stage}: collecting")
        if stage == O_STAGE:
            o_inputs = capture_inputs(layer, ATTENTION_OUTPUT, acts)
        if stage >= FIRST_MLP_STAGE and mlp_inputs is None:
            mlp_inputs = split_at_mlp(layer, acts, o_inputs)
            o_inputs = None  # the MLP stages do not need it: free an activation-sized buffer
        with sites, torch.no_grad():
            if stage == INPUT_STAGE:
                norm = layer.get_submodule(INPUT_NORM)
                for hidden in acts.batches:
                    sites.run(lambda: sites.feed(norm(hidden)))
            elif stage < O_STAGE:
                for hidden, kwargs in zip(acts.batches, acts.kwargs):
                    sites.run(lambda: layer(hidden, **kwargs))
            else:
                module, inputs = ((layer.get_submodule(ATTENTION_OUTPUT), o_inputs) if stage == O_STAGE
                                  else (layer.get_submodule(MLP_BLOCK), mlp_inputs.normed))
                for x in inputs:
                    sites.run(lambda: module(x))
        on_stage(f"layer {layer_index} stage {stage}: solving {len(stage_entries)} tensors")
        results += _solve_stage(layer, stage_entries, slots, sites)
        if stage == DOWN_STAGE and sites.experts_module:
            kept = (sites.experts_module, sites.intermediates)
        del sites  # its Hessians
    if mlp_inputs is None:  # no MLP stage ran
        mlp_inputs = split_at_mlp(layer, acts, o_inputs)
    with replayed_experts(layer, *kept, inventory.num_experts) if kept else nullcontext():
        return results, layer_outputs(layer, mlp_inputs, acts.kwargs)


@contextmanager
def replayed_experts(layer, experts_path: str, kept: list[KeptIntermediate], num_experts: int):
    """Within: the routed experts module computes its output from the down stage's intermediates, batch by
    batch in order (recomputing those not kept, bit for bit), instead of running gate/up again."""
    module = layer.get_submodule(experts_path)
    batches = iter(kept)
    outputs, recomputed, work = Scratch(), Scratch(), Scratch()

    def forward(*args, **kwargs):
        hidden, top_k_index, top_k_weights = _experts_args(args, kwargs)
        pairs = routed_pairs(top_k_index, top_k_weights, num_experts)
        batch = next(batches, None)
        if batch is None or not torch.equal(batch.counts, pairs.counts):
            raise MoeqError(f"{experts_path}: the output pass routes tokens differently from the down stage")
        P, H = pairs.tokens.numel(), hidden.shape[1]
        intermediate = batch.values
        if intermediate is None:
            buffer = recomputed.take((P, module.down_proj.shape[-1]), hidden.dtype, hidden.device)
            intermediate = _expert_intermediate(module, hidden, pairs.tokens, pairs.counts, buffer, work)
        return _experts_output(module, hidden, pairs, intermediate, outputs.take((P, H), hidden.dtype, hidden.device))

    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def capture_inputs(layer, module_path: str, acts: LayerActivations) -> list[torch.Tensor]:
    """What the layer's submodule `module_path` receives for each batch (the forward stops there)."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise _StageDone

    handle = layer.get_submodule(module_path).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for hidden, kwargs in zip(acts.batches, acts.kwargs):
                try:
                    layer(hidden, **kwargs)
                except _StageDone:
                    pass
    finally:
        handle.remove()
    return captured


def split_at_mlp(layer, acts: LayerActivations, o_inputs: list[torch.Tensor] | None) -> MlpInputs:
    """The layer's state at its MLP block from o_proj's inputs [B, L, q_out] per batch (captured here when
    None), without re-running attention: the layer's own residual add and post-attention norm on
    x + o_proj(o_input)."""
    if o_inputs is None:
        o_inputs = capture_inputs(layer, ATTENTION_OUTPUT, acts)
    o_proj, norm = layer.get_submodule(ATTENTION_OUTPUT), layer.get_submodule(POST_ATTENTION_NORM)
    with torch.no_grad():
        residual = [hidden + o_proj(x) for hidden, x in zip(acts.batches, o_inputs)]
        return MlpInputs(residual, [norm(r) for r in residual])


def layer_outputs(layer, mlp_inputs: MlpInputs, kwargs: list[dict]) -> LayerActivations:
    """The layer's outputs residual + mlp(normed) per batch, equal to its full forward."""
    mlp = layer.get_submodule(MLP_BLOCK)
    with torch.no_grad():
        return LayerActivations([r + mlp(x) for r, x in zip(mlp_inputs.residual, mlp_inputs.normed)], kwargs)


def _solve_stage(layer, entries: list[TensorPlan], slots, sites: _Sites) -> list[ModuleResult]:
    """Solve a stage's tensors: one solve per group that shares a Hessian and a scheme."""
    results = []
    linear: dict[tuple, list[TensorPlan]] = {}  # (accumulator, scheme) -> tensors, e.g. q/k/v
    for entry in [e for e in entries if e.tensor.role != "expert"]:
        accumulator = sites.hessian_for(slots[entry.tensor.name].module_path())
        linear.setdefault((accumulator, entry.scheme), []).append(entry)  # accumulators hash by identity
    for (accumulator, _), group in linear.items():
        hessian, _ = accumulator.finalize(min_tokens=0, policy="shrink")
        parts = _solve([slots[e.tensor.name].get(layer)[None] for e in group], hessian, group[0].scheme)
        for entry, (q, stats) in zip(group, parts):
            slot = slots[entry.tensor.name]
            q = q.expert(0)
            slot.set(layer, q.dequantize().to(slot.get(layer).dtype))
            results.append(_result(entry, q, stats, 0, int(accumulator.counts[0]), None))
    # routed experts: one batched solve over all experts and projections (gate and up) that share a scheme
    by_proj: dict[tuple, list[TensorPlan]] = {}
    for entry in [e for e in entries if e.tensor.role == "expert"]:
        by_proj.setdefault((entry.tensor.proj, entry.scheme), []).append(entry)
    groups: dict[tuple, list[list[TensorPlan]]] = {}  # (scheme, experts) -> one entry list per projection
    for (_, scheme), group in by_proj.items():
        groups.setdefault((scheme, tuple(e.tensor.expert for e in group)), []).append(group)
    for (scheme, experts), projections in groups.items():
        accumulator = sites.hessian_for(slots[projections[0][0].tensor.name].module_path())
        hessian, report = accumulator.finalize(min_tokens=scheme.min_tokens, policy=scheme.starved)
        hessian = hessian[torch.tensor(experts)]
        stacked = [torch.stack([slots[e.tensor.name].get(layer) for e in group]) for group in projections]
        for group, weights, (q, stats) in zip(projections, stacked, _solve(stacked, hessian, scheme)):
            results += _expert_results(layer, group, slots, weights, q, stats, report, hessian, scheme)
    return results


def _expert_results(layer, group: list[TensorPlan], slots, weights, q: QuantizedTensor, stats: dict, report,
                    hessian, scheme) -> list[ModuleResult]:
    """Write one projection's solved experts into the layer and report them; starved experts the recipe
    sends to round-to-nearest are replaced by RTN here."""
    results = []
    for i, entry in enumerate(group):
        expert_report = report[entry.tensor.expert]
        qi = q.expert(i)
        stats_i = {k: v[i:i + 1] for k, v in stats.items()}
        if expert_report.policy == "rtn":  # starved expert, recipe asked for round-to-nearest
            [(qi, stats_i)] = _solve([weights[i:i + 1]], hessian[i:i + 1], replace(scheme, method="rtn"))
            qi = qi.expert(0)
        slot = slots[entry.tensor.name]
        slot.set(layer, qi.dequantize().to(weights.dtype))
        results.append(_result(entry, qi, stats_i, 0, expert_report.tokens, expert_report.policy,
                               method="rtn" if expert_report.policy == "rtn" else scheme.method))
    return results


def _result(entry: TensorPlan, q: QuantizedTensor, stats: dict, i: int, tokens: int, fallback, method=None):
    t = entry.tensor
    return ModuleResult(
        name=t.name, role=t.role, layer=t.layer, expert=t.expert, method=method or entry.scheme.method,
        tokens=tokens, loss=float(stats["loss"][i]), rel_loss=float(stats["rel_loss"][i]),
        damp=float(stats["damp"][i]), fallback=fallback, quantized=q,
    )


def quantize_lm_head(model, entry: TensorPlan, final_hidden: LayerActivations) -> ModuleResult:
    """GPTQ for lm_head on the final-norm outputs of the calibration text; the model's head is updated."""
    head = model.lm_head
    hessian = None
    with torch.no_grad():
        for hidden in final_hidden.batches:
            x = model.model.norm(hidden).reshape(-1, hidden.shape[-1])
            if hessian is None:
                hessian = RoutedHessian(1, x.shape[-1], device=x.device)
            hessian.add_grouped(x, torch.tensor([x.shape[0]]))
        h, _ = hessian.finalize()
        [(q, stats)] = _solve([head.weight[None]], h, entry.scheme)
        q = q.expert(0)
        head.weight = torch.nn.Parameter(q.dequantize().to(head.weight.dtype), requires_grad=False)  # unties from embed
    return _result(entry, q, stats, 0, int(hessian.counts[0]), None)
