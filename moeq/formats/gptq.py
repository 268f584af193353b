"""GPTQ checkpoints as vLLM (`gptq`, `gptq_marlin`) and GPTQModel load them.

Tensors of one linear '<module>' (N out features, K in features, G groups, pf = 32 / bits):

    <module>.qweight  int32   [K / pf, N]  packed along K: column n is q[n, :] as a dense bit stream
    <module>.qzeros   int32   [G, N / pf]  packed along N: row g is the stored zero points of group g
    <module>.scales   float16 [G, N]
    <module>.g_idx    int32   [K]          k // group_size (contiguous groups; desc_act is false)

The bit stream (moeq.formats): 2/4/8 bits put value i of each word at shift (i % pf) * bits; 3 bits pack
32 values into 3 words with values 10 and 21 straddling words (AutoGPTQ's layout, which vLLM's
gptq_gemm and GPTQModel decode). K and N must be multiples of 16 / 32 / 8 / 4 at 2 / 3 / 4 / 8 bits.
Group size -1 is one group spanning K (G = 1). Leading dims [..., N, K] are packed slice by slice.

Stored zero points. checkpoint_format "gptq" (v1, the default; what vLLM's gptq_gemm and GPTQModel
assume when the field is absent) stores zero - 1; "gptq_v2" stores the zero itself. The v1 offset is
applied the way GPTQModel applies it, so GPTQModel reads every zero back exactly: at 2/4/8 bits as one
int32 word subtraction of 0x55555555 / 0x11111111 / 0x01010101 (GPTQModel's v2-to-v1 conversion; its
load adds the word back, carries included); at 3 bits per field, modulo 8 (GPTQModel's
_correct_gptq_v1_qzeros). For zeros >= 1 (every symmetric scheme: zero = 2**(bits-1), stored as
0x77777777 at 4 bits) both rules give each field zero - 1. A zero of 0 has no v1 form that vLLM reads:
its kernels add 1 to each decoded field, so a stored 2**bits - 1 reads as 2**bits. Write asymmetric
checkpoints meant for vLLM as "gptq_v2" (its `gptq` method honours it; `gptq_marlin` loads only
symmetric 4/8-bit and ignores qzeros). Sources: vllm/model_executor/layers/quantization/gptq.py
(use_v2_format), ModelCloud/GPTQModel gptqmodel/utils/model.py (convert_gptq_v1_to_v2_format_module).

The header (quantization_config in config.json) is GPTQModel's: base bits/group_size/sym/desc_act for
the most common scheme, and `dynamic` rules read in order, first `re.match` wins: "-:regex" keeps a
module unquantized, "+:regex" overrides bits/group_size/sym (vllm gptq_utils.get_dynamic_override,
GPTQModel dynamic_get). vLLM matches its own module names: fused 'qkv_proj' and each layer's expert
stack '<...>.experts' (one FusedMoE); the rules are built to resolve those too (moeq.formats.engine_names).
What vLLM then runs: gptq_marlin (the default for sym 4/8-bit) raises on a `dynamic` override to 2/3 bits
or sym=False; the `gptq` method ignores `dynamic` for MoE layers (MoeWNA16, base scheme, sym).
`modules_in_block_to_quantize` is not written: vLLM derives the quantized modules from the safetensors
dtypes when it is absent, and `-:` rules keep the rest unquantized for both loaders.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from moeq.formats import (VLLM_FUSED_LINEAR, FormatError, Scheme, as_scheme, check_header_resolves, check_quantized,
                          check_tensor, count_schemes, engine_names, ordered_cover, pack_int32, pack_words, to_int32,
                          unpack_words, values_per_word_run)

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# v1 stores zero - 1; at 2/4/8 bits GPTQModel applies it as one word subtraction of "1 in every field".
_V1_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, sym: bool,
         *, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """{qweight, qzeros, scales, g_idx} for q [..., N, K], scales/zeros [..., N, G] (see the module docstring)."""
    scheme = as_scheme((bits, group_size, sym))
    n, k, _ = check_quantized(q, scales, zeros, scheme, supported_bits=SUPPORTED_BITS, format_name="GPTQ")
    _check_format(checkpoint_format)
    _check_divisible(n, k, bits)
    width = k if group_size == -1 else group_size
    g_idx = (torch.arange(k, device=q.device) // width).to(torch.int32)
    return {
        "qweight": pack_int32(q, bits).transpose(-1, -2).contiguous(),  # [..., K / pf, N]
        "qzeros": _encode_zeros(zeros.transpose(-1, -2), bits, checkpoint_format),  # [..., G, N / pf]
        "scales": scales.transpose(-1, -2).contiguous(),  # [..., G, N]
        "g_idx": g_idx.expand(*q.shape[:-2], k).contiguous(),
    }


def unpack(tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, sym: bool,
           *, checkpoint_format: str = "gptq") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [..., N, K], scales float16 [..., N, G], zeros uint8 [..., N, G]); the inverse of pack.

    g_idx is optional; when present it must be the contiguous-group order (no desc_act permutation).
    """
    as_scheme((bits, group_size, sym))  # checks the triple
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"GPTQ stores {', '.join(map(str, SUPPORTED_BITS))}-bit weights, not bits={bits}")
    _check_format(checkpoint_format)
    if "qweight" not in tensors:
        raise FormatError("tensor 'qweight' is missing")
    qweight = tensors["qweight"]
    if qweight.dtype != torch.int32 or qweight.dim() < 2:
        raise FormatError(f"tensor 'qweight' must be int32 [..., K * {bits} / 32, N], got {qweight.dtype} "
                          f"{tuple(qweight.shape)}")
    *lead, k_words, n = qweight.shape
    k = k_words * 32 // bits
    if k_words * 32 % bits:
        raise FormatError(f"tensor 'qweight' has {k_words} rows, not a whole number of {bits}-bit values")
    _check_divisible(n, k, bits)
    if group_size != -1 and k % group_size:
        raise FormatError(f"group_size={group_size} does not divide K={k} (from qweight {tuple(qweight.shape)})")
    g = 1 if group_size == -1 else k // group_size
    why = f"K={k}, N={n}, {bits}-bit, group_size={group_size}"
    qzeros = check_tensor(tensors, "qzeros", torch.int32, (*lead, g, n * bits // 32), why)
    scales = check_tensor(tensors, "scales", torch.float16, (*lead, g, n), why)
    if "g_idx" in tensors:
        g_idx = check_tensor(tensors, "g_idx", torch.int32, (*lead, k), why)
        width = k if group_size == -1 else group_size
        if not torch.equal(g_idx, (torch.arange(k, device=g_idx.device) // width).to(torch.int32).expand_as(g_idx)):
            raise FormatError("tensor 'g_idx' is not k // group_size: act-order (desc_act) checkpoints, whose "
                              "columns are permuted, are not supported")
    q = unpack_words(qweight.transpose(-1, -2), bits, k).to(torch.uint8)
    zeros = _decode_zeros(qzeros, bits, n, checkpoint_format).transpose(-1, -2).contiguous().to(torch.uint8)
    if sym and not bool((zeros == 2 ** (bits - 1)).all()):
        raise FormatError(f"the header says sym=True but qzeros do not decode to {2 ** (bits - 1)} "
                          f"(is checkpoint_format '{checkpoint_format}' right?)")
    return q, scales.transpose(-1, -2).contiguous(), zeros


def _encode_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """zeros [..., G, N] -> qzeros int32 [..., G, N / pf] with the format's stored offset."""
    if checkpoint_format == "gptq_v2":
        return pack_int32(zeros, bits)
    if bits == 3:  # fields straddle words: shift each field, modulo 8 (GPTQModel's 3-bit rule)
        return pack_int32((zeros.to(torch.int64) - 1) & 7, bits)
    return to_int32((pack_words(zeros, bits) - _V1_ONES[bits]) % 2 ** 32)


def _decode_zeros(qzeros: torch.Tensor, bits: int, n: int, checkpoint_format: str) -> torch.Tensor:
    """qzeros int32 [..., G, N / pf] -> zeros int64 [..., G, N]."""
    if checkpoint_format == "gptq_v2":
        return unpack_words(qzeros, bits, n)
    if bits == 3:
        return (unpack_words(qzeros, bits, n) + 1) & 7
    return unpack_words((qzeros.to(torch.int64) + _V1_ONES[bits]) % 2 ** 32, bits, n)


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise FormatError(f"checkpoint_format={checkpoint_format!r}; GPTQ checkpoints are one of {CHECKPOINT_FORMATS}")


def _check_divisible(n: int, k: int, bits: int) -> None:
    run = values_per_word_run(bits)
    for what, size in (("K (in features)", k), ("N (out features)", n)):
        if size % run:
            raise FormatError(f"GPTQ packs {bits}-bit values {run} to a whole number of int32 words, so {what} "
                              f"must be a multiple of {run}, got {size}")


# ---- the header -----------------------------------------------------------------------------------------

def quantization_config(per_module: Mapping[str, object], *, checkpoint_format: str = "gptq",
                        vllm_groups: bool = True) -> dict:
    """config.json `quantization_config` for a mixed-bit GPTQ checkpoint.

    per_module: every linear module of the checkpoint (tensor name without '.weight'), mapped to its
    format (a QuantFormat, anything with bits/group_size/sym, or a (bits, group_size, sym) tuple) or
    None for a module kept in bf16 (routers, kept layers). The most common scheme becomes the base;
    `dynamic` holds "-:" rules for kept modules, then "+:" overrides. vllm_groups: check that modules vLLM
    loads as one (q/k/v, a layer's experts) share a scheme and make the rules resolve vLLM's names too.
    """
    _check_format(checkpoint_format)
    schemes = {name: None if fmt is None else as_scheme(fmt) for name, fmt in per_module.items()}
    for name, s in schemes.items():
        if s is not None and s.bits not in SUPPORTED_BITS:
            raise FormatError(f"{name}: GPTQ stores {', '.join(map(str, SUPPORTED_BITS))}-bit weights, not {s.bits}")
    ranked = count_schemes(schemes)
    if not ranked:
        raise FormatError("no module is quantized; a GPTQ header needs at least one quantized module")
    base = ranked[0]
    names = engine_names(schemes) if vllm_groups else dict(schemes)
    # kept modules first, then overrides from the least used up, so wider patterns come last
    cover = ordered_cover(names, [None, *reversed(ranked[1:])])
    dynamic: dict[str, dict] = {}
    for scheme, patterns in cover:
        for p in patterns:
            dynamic[f"-:{p}" if scheme is None else f"+:{p}"] = (
                {} if scheme is None else {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym})
    cfg = {
        "quant_method": "gptq",
        "bits": base.bits,
        "group_size": base.group_size,
        "sym": base.sym,
        "desc_act": False,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": any(s is not None for n, s in schemes.items() if _is_lm_head(n)),
        "dynamic": dynamic,
    }
    check_header_resolves("GPTQ", read_quantization_config(cfg), names)
    return cfg


def read_quantization_config(cfg: Mapping) -> Callable[[str], Scheme | None]:
    """module name -> its Scheme, or None when kept unquantized, resolved as vLLM and GPTQModel do.

    The checkpoint's zero-point convention is cfg.get("checkpoint_format", "gptq"); pass it to unpack.
    """
    if cfg.get("quant_method") != "gptq":
        raise FormatError(f"quantization_config.quant_method is {cfg.get('quant_method')!r}, not 'gptq'")
    _check_format(cfg.get("checkpoint_format") or "gptq")
    try:
        base = Scheme(cfg["bits"], cfg["group_size"], cfg.get("sym", True))  # AutoGPTQ's default: sym
    except KeyError as e:
        raise FormatError(f"quantization_config has no '{e.args[0]}'") from None
    lm_head = bool(cfg.get("lm_head", False))
    rules = []
    for key, overrides in (cfg.get("dynamic") or {}).items():
        negative = key.startswith("-:")
        pattern = re.compile(key[2:] if key.startswith(("-:", "+:")) else key)
        rules.append((pattern, None if negative else Scheme(overrides.get("bits", base.bits),
                                                            overrides.get("group_size", base.group_size),
                                                            overrides.get("sym", base.sym))))

    def resolve(name: str) -> Scheme | None:
        if _is_lm_head(name) and not lm_head:
            return None
        for pattern, scheme in rules:
            if pattern.match(name):
                return scheme
        return base

    return resolve


def _is_lm_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "lm_head"


__all__ = ["CHECKPOINT_FORMATS", "SUPPORTED_BITS", "VLLM_FUSED_LINEAR", "pack", "quantization_config",
           "read_quantization_config", "unpack"]
