"""`moeq quantize`: calibrate, solve and write a whole model, one decoder layer resident at a time.

Evaluation text (when given) travels through the same layer loop twice, once through the original
layer and once through the quantized one, so perplexity before and after and the per-layer routing
agreement come without ever loading the whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moeq import __version__
from moeq.calibration import calibration_windows, coverage_advice, evaluation_windows, read_token_stream
from moeq.checkpoint import CheckpointWriter, gptq_checkpoint_format, quantization_config, stored_tensors
from moeq.errors import MoeqError
from moeq.evaluate import perplexity
from moeq.pipeline import (LayerActivations, ModuleResult, build_skeleton, capture_layer_inputs, compute_dtype,
                           load_layer, load_model_tensor, quantize_layer, quantize_lm_head, run_layer)
from moeq.padding import pad_plan, pad_tensor, padded_config
from moeq.plan import Plan
from moeq.report import PhaseClock, QuantizationReport, RoutingRecorder
from moeq.shards import ShardReader, weight_slot


# phases of the run's time, in the summary
CALIBRATION = "calibration forwards and solves"
SETUP = "set-up"
EVALUATION = "evaluation"
READING = "reading shards"
WRITING = "writing"


@dataclass(frozen=True)
class QuantizeConfig:
    calib: Path
    out: Path
    eval: Path | None = None
    calib_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    eval_windows: int = 64
    batch_size: int = 16          # sequences per forward pass
    device: str = "auto"          # "auto": cuda when present, else cpu
    text_field: str = "text"
    resume: bool = False
    force: bool = False
    format: str = "gptq"          # "gptq" | "compressed-tensors" | "dequantized"
    pad_intermediate_to: int | None = None  # zero-pad the experts' intermediate size (moeq.padding)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _batches(windows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(windows.split(size))


def quantize_model(plan: Plan, config: QuantizeConfig, log=print) -> QuantizationReport:
    """Quantize `plan.inventory`'s checkpoint per `plan` and write it to config.out."""
    inventory = plan.inventory
    model_dir = Path(inventory.model_dir)
    if config.eval is not None and (Path(config.eval).resolve() == Path(config.calib).resolve()
                                    or _file_digest(Path(config.eval)) == _file_digest(Path(config.calib))):
        raise MoeqError(f"--eval {config.eval} is the calibration text; perplexity on it would flatter the result. "
                        "Evaluate on text the calibration never saw")
    device = resolve_device(config.device)
    padding = (pad_plan(inventory, config.pad_intermediate_to, {e.tensor.name: e.scheme for e in plan.entries})
               if config.pad_intermediate_to else None)  # errors before any compute
    dtype = compute_dtype(device)
    clock = PhaseClock()
    with clock.phase(SETUP):  # tokenizing, transformers' model code, the embedding
        from transformers import AutoTokenizer

        # the skeleton (importing transformers' modeling code: seconds of Python) is built while the Rust
        # tokenizer, which releases the GIL, reads the text
        with ThreadPoolExecutor(1) as pool:
            skeleton = pool.submit(build_skeleton, inventory.config, device, dtype)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            calib_ids = calibration_windows(read_token_stream(config.calib, tokenizer, config.text_field),
                                            config.calib_samples, config.seq_len, config.seed)
            eval_ids = None
            if config.eval is not None:
                eval_ids = evaluation_windows(read_token_stream(config.eval, tokenizer, config.text_field),
                                              config.eval_windows, config.seq_len)
            model = skeleton.result()
        num_params = sum(t.numel for t in inventory.tensors)
        for advice in coverage_advice(num_params, config.calib_samples, config.seq_len):
            log(f"warning: {advice}")
        evaluation = f"; evaluation: {eval_ids.numel()} tokens from {config.eval}" if eval_ids is not None else ""
        log(f"calibration: {calib_ids.shape[0]} x {calib_ids.shape[1]} = {calib_ids.numel()} tokens "
            f"from {config.calib}{evaluation}")

        reader = ShardReader(inventory)
        load_model_tensor(model, reader, plan, "model.embed_tokens.weight", device, dtype)
        calib_batches = _batches(calib_ids, config.batch_size)
        eval_batches = _batches(eval_ids, config.batch_size) if eval_ids is not None else []
        calib = capture_layer_inputs(model, calib_batches, device)
        eval_fp = capture_layer_inputs(model, eval_batches, device) if eval_batches else None
        eval_q = eval_fp

    writer = CheckpointWriter(config.out, inventory.num_layers + 1, force=config.force, resume=config.resume)
    results: list[ModuleResult] = []
    agreement: dict[int, float] = {}
    first_layer = 0
    resume_path = writer.partial / "resume.pt"
    if config.resume and resume_path.is_file():
        state = torch.load(resume_path, map_location=device, weights_only=False)
        first_layer = state["next_layer"]
        calib = LayerActivations(state["calib"], calib.kwargs)
        if eval_fp is not None:
            eval_fp = LayerActivations(state["eval_fp"], eval_fp.kwargs)
            eval_q = LayerActivations(state["eval_q"], eval_q.kwargs)
        results, agreement = state["results"], state["agreement"]
        log(f"resuming from layer {first_layer} ({writer.partial})")

    from tqdm.auto import tqdm

    layers = range(first_layer, inventory.num_layers)
    bar = tqdm(layers, desc="quantizing", unit="layer", dynamic_ncols=True)
    for i in bar:
        with clock.phase(READING):
            layer = load_layer(model, reader, i, device, dtype)
        routing_fp = None
        if eval_fp is not None:
            bar.set_postfix_str("eval (original)")
            with clock.phase(EVALUATION):
                routing_fp, eval_fp = RoutingRecorder.record(layer, lambda: run_layer(layer, eval_fp))
        entries = [e for e in plan.entries if e.tensor.layer == i]
        with clock.phase(CALIBRATION):
            layer_results, calib = quantize_layer(layer, i, entries, plan, calib, on_stage=bar.set_postfix_str)
        # the shard below holds the tensors: keeping them (and saving them in every resume state) would
        # hold the whole quantized model in memory and write it again after every layer
        results += [r.numbers_only() for r in layer_results]
        if eval_q is not None:
            bar.set_postfix_str("eval (quantized)")
            with clock.phase(EVALUATION):
                routing_q, eval_q = RoutingRecorder.record(layer, lambda: run_layer(layer, eval_q))
            if routing_fp is not None and routing_q is not None:
                agreement[i] = RoutingRecorder.fraction(routing_fp, routing_q)
        with clock.phase(WRITING):
            quantized = {r.name: r.quantized for r in layer_results}
            writer.write_shard(i, _tensors_to_write(plan, config, inventory.layer_tensors(i), quantized,
                                                    lambda t: weight_slot(t, inventory).get(layer), padding))
            layer.to_empty(device="meta")
            state = {"next_layer": i + 1, "calib": calib.batches, "results": results, "agreement": agreement,
                     "eval_fp": eval_fp.batches if eval_fp else None, "eval_q": eval_q.batches if eval_q else None}
            torch.save(state, resume_path.with_suffix(".tmp"))
            os.replace(resume_path.with_suffix(".tmp"), resume_path)

    # model-level tensors: final norm, lm_head (tied to the embedding when the config says so)
    load_model_tensor(model, reader, plan, "model.norm.weight", device, dtype)
    if "lm_head.weight" in inventory.by_name:
        load_model_tensor(model, reader, plan, "lm_head.weight", device, dtype)
    else:
        model.lm_head.weight = model.model.embed_tokens.weight
    ppl = {}
    if eval_fp is not None:
        with clock.phase(EVALUATION):
            ppl["before"] = perplexity(eval_fp.batches, eval_batches, model.model.norm, model.lm_head)
    head = plan.by_name.get("lm_head.weight")
    if head is not None and head.scheme is not None:
        bar.set_postfix_str("lm_head")
        with clock.phase(CALIBRATION):
            results.append(quantize_lm_head(model, head, calib))
    if eval_fp is not None:
        with clock.phase(EVALUATION):
            ppl["after"] = perplexity(eval_q.batches, eval_batches, model.model.norm, model.lm_head)
    model_level = [t for t in inventory.tensors if t.layer is None or t.layer >= inventory.num_layers]
    with clock.phase(WRITING):
        writer.write_shard(inventory.num_layers, _tensors_to_write(plan, config, model_level,
                                                                   {r.name: r.quantized for r in results},
                                                                   reader.read, padding))
    report = QuantizationReport.build(plan, results, agreement, ppl, calib_ids.numel(), clock)
    sidecar = {"moeq_version": __version__, "format": config.format, "recipe": plan.recipe.source,
               "run": {k: str(v) for k, v in asdict(config).items()}, "report": report.to_json()}
    config_json = json.loads((model_dir / "config.json").read_text())
    if padding is not None:
        config_json = padded_config(config_json, padding)
        sidecar["padding"] = padding.config_updates
    header = quantization_config(config.format, _per_module_formats(plan))
    if header is not None:
        config_json["quantization_config"] = header
    writer.finish(model_dir, config_json, sidecar)
    return report


def _per_module_formats(plan: Plan) -> dict:
    """Every linear module of the checkpoint -> its stored QuantFormat, or None when kept."""
    return {e.tensor.module: None if e.scheme is None else e.scheme.format for e in plan.entries
            if e.tensor.quantizable}


def _tensors_to_write(plan: Plan, config: QuantizeConfig, tensors, quantized: dict, value_of, padding) -> dict:
    """The stored form of `tensors`: kept ones as they are, quantized ones packed in config.format,
    zero-padded first when `padding` (a moeq.padding.PaddingSpec) says so."""
    checkpoint_format = gptq_checkpoint_format(_per_module_formats(plan).values())
    out = {}
    for t in tensors:
        q = quantized.get(t.name)
        value = value_of(t) if q is None else None
        if padding is not None:
            q, value = (pad_tensor(padding, t, q), None) if q is not None else (None, pad_tensor(padding, t, value))
        out.update(stored_tensors(config.format, t, value, q, checkpoint_format))
    return out
