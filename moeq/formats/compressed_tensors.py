"""compressed-tensors `pack-quantized` checkpoints, as compressed-tensors 0.20 writes them and vLLM loads them.

Tensors of one linear '<module>' (N out features, K in features, G groups), matching
compressed_tensors/compressors/pack_quantized (PackedQuantizationCompressor, pack_to_int32):

    <module>.weight_packed      int32   [N, ceil(K * bits / 32)]  each row a dense bit stream along K
    <module>.weight_scale       float16 [N, G]
    <module>.weight_shape       int64   [2]                       (N, K)
    <module>.weight_zero_point  int32   [ceil(N * bits / 32), G]  asymmetric only, packed along N

compressed-tensors quantizes to signed integers in [-2**(bits-1), 2**(bits-1) - 1] and adds 2**(bits-1)
before packing (weights and zero points alike), so the stored fields are exactly moeq's unsigned q and
zeros: W = (q_s - z_s) * s = (q - z) * s. Symmetric schemes store no zero point (the implied unsigned
zero is 2**(bits-1)). The stream is dense (moeq.formats): runs of 32 values fill `bits` words, a tail is
padded with zeros and only the words it reaches are kept, so any N and K are allowed; at 2/4/8 bits
this is the classic 32 / bits values per word, at 3 bits 32 values fill 3 words (0.20's layout; older
releases packed 10 per word). Scales are stored in float16, exactly as fitted; an engine running in
bfloat16 casts them on load.

The header (quantization_config) has one config group per scheme, `targets` as "re:" regexes, and the
kept modules in `ignore`; resolution is vLLM's (compressed_tensors.py get_scheme_dict: ignore first,
then the first target in group order, `re.match`) and compressed-tensors' own (apply_quantization_config:
ignore, then the first matching target). vLLM looks a MoE layer up under '<stack>.0.gate_proj',
'.0.up_proj' and '.0.down_proj' whatever the family calls its experts, and q/k/v under 'qkv_proj';
the regexes are built to resolve those too (moeq.formats.engine_names). vLLM's WNA16 kernels load 4 and
8 bits (asymmetric through zero points); 2 and 3 bits load in compressed-tensors / transformers only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from moeq.formats import (FormatError, Scheme, as_scheme, check_header_resolves, check_quantized, check_tensor,
                          count_schemes, engine_names, ordered_cover, pack_int32, unpack_words)

SUPPORTED_BITS = (2, 3, 4, 8)
FORMAT = "pack-quantized"


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
         sym: bool) -> dict[str, torch.Tensor]:
    """{weight_packed, weight_scale, weight_shape[, weight_zero_point]} for q [..., N, K] (module docstring)."""
    scheme = as_scheme((bits, group_size, sym))
    check_quantized(q, scales, zeros, scheme, supported_bits=SUPPORTED_BITS, format_name="pack-quantized")
    out = {
        "weight_packed": pack_int32(q, bits),  # [..., N, ceil(K * bits / 32)]
        "weight_scale": scales.contiguous(),
        "weight_shape": torch.tensor(q.shape, dtype=torch.int64, device=q.device),
    }
    if not sym:  # packed along N: [..., ceil(N * bits / 32), G]
        out["weight_zero_point"] = pack_int32(zeros.transpose(-1, -2), bits).transpose(-1, -2).contiguous()
    return out


def unpack(tensors: Mapping[str, torch.Tensor], bits: int, group_size: int,
           sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [..., N, K], scales float16 [..., N, G], zeros uint8 [..., N, G]); the inverse of pack."""
    as_scheme((bits, group_size, sym))
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"pack-quantized stores {', '.join(map(str, SUPPORTED_BITS))}-bit weights here, "
                          f"not bits={bits}")
    if "weight_shape" not in tensors:
        raise FormatError("tensor 'weight_shape' is missing")
    shape = tensors["weight_shape"]
    if shape.dtype not in (torch.int64, torch.int32) or shape.dim() != 1 or shape.numel() < 2:
        raise FormatError(f"tensor 'weight_shape' must be int64 [ndim] (N, K), got {shape.dtype} {tuple(shape.shape)}")
    *lead, n, k = (int(x) for x in shape.tolist())
    if group_size != -1 and k % group_size:
        raise FormatError(f"group_size={group_size} does not divide K={k} (from weight_shape)")
    g = 1 if group_size == -1 else k // group_size
    why = f"weight_shape {(*lead, n, k)}, {bits}-bit, group_size={group_size}"
    packed = check_tensor(tensors, "weight_packed", torch.int32, (*lead, n, -(-k * bits // 32)), why)
    scales = check_tensor(tensors, "weight_scale", torch.float16, (*lead, n, g), why)
    q = unpack_words(packed, bits, k).to(torch.uint8)
    if sym:
        if "weight_zero_point" in tensors:
            raise FormatError("tensor 'weight_zero_point' is present but the scheme is symmetric")
        zeros = torch.full((*lead, n, g), 2 ** (bits - 1), dtype=torch.uint8, device=q.device)
    else:
        zp = check_tensor(tensors, "weight_zero_point", torch.int32, (*lead, -(-n * bits // 32), g), why)
        zeros = unpack_words(zp.transpose(-1, -2), bits, n).transpose(-1, -2).contiguous().to(torch.uint8)
    return q, scales.contiguous(), zeros


# ---- the header -----------------------------------------------------------------------------------------

def quantization_config(per_module: Mapping[str, object], *, vllm_groups: bool = True) -> dict:
    """config.json `quantization_config` for a mixed-bit pack-quantized checkpoint.

    per_module: every linear module of the checkpoint (tensor name without '.weight'), mapped to its
    format (a QuantFormat, anything with bits/group_size/sym, or a (bits, group_size, sym) tuple) or
    None for a module kept in bf16. One config group per scheme, least used first so the widest
    patterns come last; kept modules go to `ignore`. vllm_groups: check that modules vLLM loads as one
    (q/k/v, a layer's experts) share a scheme and make the patterns resolve vLLM's names too.
    """
    schemes = {name: None if fmt is None else as_scheme(fmt) for name, fmt in per_module.items()}
    for name, s in schemes.items():
        if s is not None and s.bits not in SUPPORTED_BITS:
            raise FormatError(f"{name}: pack-quantized stores {', '.join(map(str, SUPPORTED_BITS))}-bit "
                              f"weights here, not {s.bits}")
    ranked = count_schemes(schemes)
    if not ranked:
        raise FormatError("no module is quantized; a compressed-tensors header needs a quantized module")
    names = engine_names(schemes) if vllm_groups else dict(schemes)
    cover = ordered_cover(names, [None, *reversed(ranked)])
    ignore = [f"re:{p}" for p in cover[0][1]]
    groups = {}
    for i, (scheme, patterns) in enumerate(cover[1:]):
        groups[f"group_{i}"] = {
            "targets": [f"re:{p}" for p in patterns],
            "weights": {
                "num_bits": scheme.bits,
                "type": "int",
                "symmetric": scheme.sym,
                "strategy": "channel" if scheme.group_size == -1 else "group",
                "group_size": None if scheme.group_size == -1 else scheme.group_size,
                "dynamic": False,
                "actorder": None,
            },
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    cfg = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    check_header_resolves("compressed-tensors", read_quantization_config(cfg), names)
    return cfg


def read_quantization_config(cfg: Mapping) -> Callable[[str], Scheme | None]:
    """module name -> its Scheme, or None when ignored or untargeted, resolved as vLLM does.

    Targets are module names, "re:" regexes, or class names ("Linear"), which match every module asked about.
    """
    if cfg.get("quant_method") != "compressed-tensors":
        raise FormatError(f"quantization_config.quant_method is {cfg.get('quant_method')!r}, "
                          f"not 'compressed-tensors'")
    if cfg.get("quantization_status", "compressed") != "compressed":
        raise FormatError(f"quantization_status is {cfg.get('quantization_status')!r}: the weights are not "
                          f"packed ('compressed')")
    targets: list[tuple[str, Scheme]] = []
    for group_name, group in (cfg.get("config_groups") or {}).items():
        fmt = group.get("format") or cfg.get("format")
        w = group.get("weights") or {}
        strategy = w.get("strategy") or ("channel" if w.get("group_size") in (None, -1) else "group")
        if fmt != FORMAT or w.get("type", "int") != "int" or strategy not in ("group", "channel") \
                or group.get("input_activations"):
            raise FormatError(f"config group '{group_name}' is not an integer weight-only pack-quantized scheme "
                              f"(format={fmt!r}, weights={w!r}, input_activations={group.get('input_activations')!r})")
        scheme = Scheme(w.get("num_bits", 8), -1 if strategy == "channel" else w["group_size"],
                        w.get("symmetric", True))
        targets += [(t, scheme) for t in group.get("targets", [])]
    ignore = list(cfg.get("ignore") or [])
    matchers = {t: _matcher(t) for t in ignore + [t for t, _ in targets]}

    def resolve(name: str) -> Scheme | None:
        if any(matchers[t](name) for t in ignore):
            return None
        for target, scheme in targets:
            if matchers[target](name):
                return scheme
        return None

    return resolve


def _matcher(target: str) -> Callable[[str], bool]:
    if target.startswith("re:"):
        pattern = re.compile(target[3:])
        return lambda name: pattern.match(name) is not None
    if "." not in target and target[:1].isupper():  # a class name such as "Linear"
        return lambda name: True
    return lambda name: name == target


__all__ = ["FORMAT", "SUPPORTED_BITS", "pack", "quantization_config", "read_quantization_config", "unpack"]
