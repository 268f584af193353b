"""What happened to every module: the end-of-run table, anomaly flags, routing agreement, and the JSON."""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moeq.plan import Plan

# Anomaly thresholds on rel_loss = tr(dW H dW^T) / tr(W H W^T), the relative output error of a module.
EARLY_LAYERS = 3
EARLY_REL_LOSS = 0.05     # int4 on a sane early layer stays near 1e-2; far above: wrong calibration or tokenizer
OUTLIER_FACTOR = 10.0     # a module far above its (layer, role) median


class PhaseClock:
    """Wall seconds of a run, per named phase (a phase may be entered many times: its times add up)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def total(self) -> float:
        return time.perf_counter() - self.started


class RoutingRecorder:
    """Captures the top-k expert choice of a layer's experts module during a forward."""

    @staticmethod
    def record(layer, forward):
        """(list of top_k_index per batch or None when the layer has no experts module, forward's result)."""
        experts = next((m for name, m in layer.named_modules() if name.endswith("experts")
                        and hasattr(m, "gate_up_proj")), None)
        if experts is None:
            return None, forward()
        seen = []

        def hook(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen.append(index.sort(dim=-1).values.cpu())

        handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            result = forward()
        finally:
            handle.remove()
        return seen, result

    @staticmethod
    def fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
        """Fraction of tokens whose set of top-k experts is unchanged."""
        same = sum(int((a == b).all(dim=-1).sum()) for a, b in zip(before, after))
        total = sum(a.shape[0] for a in before)
        return same / max(total, 1)


@dataclass(frozen=True)
class QuantizationReport:
    rows: list[dict]                  # one per (layer, role)
    modules: list[dict]               # one per quantized tensor
    flags: list[str]
    perplexity: dict[str, float]
    agreement: dict[int, float]
    calibration_tokens: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (PhaseClock), largest first
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, plan: Plan, results, agreement, ppl, calibration_tokens, clock: PhaseClock) -> "QuantizationReport":
        modules = [{k: v for k, v in r.__dict__.items() if k != "quantized"} for r in results]
        groups: dict[tuple, list[dict]] = {}
        for m in modules:
            groups.setdefault((m["layer"], m["role"]), []).append(m)
        rows, flags = [], []
        for (layer, role), group in sorted(groups.items(), key=lambda kv: (kv[0][0] if kv[0][0] is not None else 1e9, kv[0][1])):
            losses = [m["rel_loss"] for m in group]
            median = statistics.median(losses)
            worst = max(group, key=lambda m: m["rel_loss"] if math.isfinite(m["rel_loss"]) else math.inf)
            row = {"layer": layer, "role": role, "tensors": len(group), "mean_loss": statistics.fmean(m["loss"] for m in group),
                   "mean_rel_loss": statistics.fmean(losses), "worst": worst["name"], "worst_rel_loss": worst["rel_loss"],
                   "max_damp": max(m["damp"] for m in group),
                   "fallbacks": sum(1 for m in group if m["fallback"])}
            if role == "expert":
                tokens = {}
                for m in group:
                    tokens[m["expert"]] = m["tokens"]
                counts = sorted(tokens.values())
                row.update(tokens_min=counts[0], tokens_median=statistics.median(counts), tokens_max=counts[-1],
                           worst_expert=worst["expert"])
                for expert, n in sorted(tokens.items()):
                    if n == 0:
                        flags.append(f"layer {layer} expert {expert}: 0 calibration tokens "
                                     f"({next(m['fallback'] for m in group if m['expert'] == expert)} fallback)")
            rows.append(row)
            for m in group:
                if not (math.isfinite(m["loss"]) and math.isfinite(m["rel_loss"])):
                    flags.append(f"{m['name']}: loss is NaN/inf")
                elif median > 0 and m["rel_loss"] > OUTLIER_FACTOR * median and m["rel_loss"] > 1e-3:
                    flags.append(f"{m['name']}: relative loss {m['rel_loss']:.3g} is {m['rel_loss'] / median:.0f}x "
                                 f"its layer's {role} median")
            if layer is not None and layer < EARLY_LAYERS and row["mean_rel_loss"] > EARLY_REL_LOSS:
                flags.append(f"LOUD: layer {layer} {role} relative loss {row['mean_rel_loss']:.3g} in an early layer: "
                             "the calibration text or the tokenizer is probably wrong for this model")
        phases = dict(sorted(clock.seconds.items(), key=lambda kv: -kv[1]))
        return cls(rows, modules, flags, dict(ppl), dict(agreement), calibration_tokens, clock.total(), phases)

    def table(self) -> str:
        header = ("layer", "role", "n", "mean loss", "rel loss", "worst (rel)", "tokens/expert min/med/max",
                  "damp", "fallbacks")
        lines = [header]
        for r in self.rows:
            tokens = (f"{r['tokens_min']}/{r['tokens_median']:.0f}/{r['tokens_max']}" if "tokens_min" in r else "-")
            worst = (f"e{r['worst_expert']} {r['worst_rel_loss']:.2e}" if "worst_expert" in r
                     else f"{r['worst'].rsplit('.', 2)[-2]} {r['worst_rel_loss']:.2e}")
            lines.append((str(r["layer"]), r["role"], str(r["tensors"]), f"{r['mean_loss']:.3e}",
                          f"{r['mean_rel_loss']:.2e}", worst, tokens, f"{r['max_damp']:.3g}", str(r["fallbacks"])))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        if self.agreement:
            text.append("routing agreement on eval tokens (top-k unchanged): "
                        + ", ".join(f"L{k} {v:.1%}" for k, v in sorted(self.agreement.items())))
        if self.perplexity:
            b, a = self.perplexity["before"], self.perplexity["after"]
            text.append(f"perplexity on eval text: {b:.3f} -> {a:.3f} ({100 * (a / b - 1):+.2f}%)")
        phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items())
        text.append(f"calibration tokens: {self.calibration_tokens}; time: {self.seconds:.1f} s"
                    + (f" ({phases})" if phases else ""))
        text += [f"FLAG: {f}" for f in self.flags] or ["no anomalies flagged"]
        return "\n".join(text)

    def to_json(self) -> dict:
        return {"rows": self.rows, "modules": self.modules, "flags": self.flags, "perplexity": self.perplexity,
                "routing_agreement": {str(k): v for k, v in self.agreement.items()},
                "calibration_tokens": self.calibration_tokens, "seconds": self.seconds, "phases": self.phases,
                **self.extra}
