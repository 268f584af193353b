"""Tensor formats of quantized checkpoints, and the module-name rules their config.json headers use.

Every format packs one linear weight W [..., N, K] given in moeq's stored convention (moeq.quant_format):

    q       uint8   [..., N, K]  in [0, 2**bits - 1], original column order
    scales  float16 [..., N, G]  G = K // group_size, or 1 for group_size == -1 (per channel)
    zeros   uint8   [..., N, G]  symmetric formats store 2**(bits - 1) everywhere
    W[..., n, k] = (q[..., n, k] - zeros[..., n, k // group_size]) * scales[..., n, k // group_size]

Groups are contiguous in the original column order (act-order uses static groups), so there is never a
permutation to store. Submodules:

    gptq                the GPTQ layout that vLLM (gptq, gptq_marlin) and GPTQModel load
    compressed_tensors  compressed-tensors' pack-quantized layout that vLLM and compressed-tensors load

This module holds what both share:

  * `Scheme`, the (bits, group_size, sym) triple a header assigns to a module;
  * the dense little-endian bit stream both formats pack integers into: in every run of 32 values,
    value i occupies bits [i * bits, (i + 1) * bits) of a `bits`-word little-endian stream, so a value
    may straddle two int32 words (only at 3 bits). For 2/4/8 bits this is the familiar "value i of a
    word at shift (i % (32 // bits)) * bits"; at 3 bits it is GPTQ's interleaved 3-words-per-32 layout;
  * the regex cover: compact `re.match` patterns that give every module of a mixed-bit model its scheme
    under first-match resolution, as vLLM, GPTQModel and compressed-tensors resolve them;
  * `engine_names`: the extra module names vLLM resolves (fused q/k/v, each layer's expert stack).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch

from moeq.errors import CheckpointError


class FormatError(CheckpointError, ValueError):
    """A tensor, scheme or header that a checkpoint format cannot hold or does not describe."""


class Scheme(NamedTuple):
    """What a header says about one module: bits, group size (-1: per channel), symmetric."""

    bits: int
    group_size: int
    sym: bool


def as_scheme(fmt) -> Scheme:
    """A Scheme from a (bits, group_size, sym) triple or any object with those attributes (QuantFormat)."""
    if isinstance(fmt, tuple):
        bits, group_size, sym = fmt
    else:
        bits, group_size, sym = fmt.bits, fmt.group_size, fmt.sym
    if not isinstance(bits, int) or not isinstance(group_size, int) or not isinstance(sym, bool):
        raise FormatError(f"a scheme is (bits: int, group_size: int, sym: bool), got {fmt!r}")
    if group_size != -1 and group_size <= 0:
        raise FormatError(f"group_size={group_size} is not allowed; use -1 (per channel) or a positive size")
    return Scheme(bits, group_size, sym)


# ---- input checks ------------------------------------------------------------------------------------

def check_quantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: Scheme, *,
                    supported_bits: Iterable[int], format_name: str) -> tuple[int, int, int]:
    """(N, K, G) after checking q/scales/zeros against the stored convention and the scheme."""
    bits, group_size, sym = scheme
    supported = tuple(supported_bits)
    if bits not in supported:
        raise FormatError(f"{format_name} stores {', '.join(map(str, supported))}-bit weights, not bits={bits}")
    if q.dtype != torch.uint8 or q.dim() < 2:
        raise FormatError(f"q must be uint8 [..., N, K], got {q.dtype} {tuple(q.shape)}")
    *lead, n, k = q.shape
    if group_size != -1 and k % group_size:
        raise FormatError(f"group_size={group_size} does not divide K={k} input features")
    g = 1 if group_size == -1 else k // group_size
    for name, t, dtype in (("scales", scales, torch.float16), ("zeros", zeros, torch.uint8)):
        if t.dtype != dtype or tuple(t.shape) != (*lead, n, g):
            raise FormatError(f"{name} must be {dtype} of shape {(*lead, n, g)} for q {tuple(q.shape)} and "
                              f"group_size={group_size}, got {t.dtype} {tuple(t.shape)}")
    maxq = 2 ** bits - 1
    if q.numel() and int(q.max()) > maxq:
        raise FormatError(f"q holds {int(q.max())}, above 2**{bits} - 1 = {maxq}")
    if zeros.numel() and int(zeros.max()) > maxq:
        raise FormatError(f"zeros holds {int(zeros.max())}, above 2**{bits} - 1 = {maxq}")
    if sym and zeros.numel() and not bool((zeros == 2 ** (bits - 1)).all()):
        raise FormatError(f"a symmetric {bits}-bit scheme stores zero = {2 ** (bits - 1)} everywhere; "
                          f"these zeros differ (quantize with sym=False, or fix the zero points)")
    return n, k, g


def check_tensor(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple,
                 why: str) -> torch.Tensor:
    """tensors[name], which must exist with this dtype and shape; `why` says where the shape comes from."""
    if name not in tensors:
        raise FormatError(f"tensor '{name}' is missing (expected {dtype} {shape}, {why})")
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise FormatError(f"tensor '{name}' must be {dtype} of shape {tuple(shape)} ({why}), "
                          f"got {t.dtype} {tuple(t.shape)}")
    return t


# ---- the dense little-endian bit stream ------------------------------------------------------------------

_WORD = 2 ** 32


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned words as int64 in [0, 2**32): values [..., L] (each < 2**bits) -> [..., ceil(L * bits / 32)].

    Runs of 32 values fill `bits` words; value i of a run starts at stream bit i * bits. A tail shorter
    than 32 values is padded with zeros and only the words it reaches are kept (compressed-tensors' rule).
    """
    *lead, length = values.shape
    runs = -(-length // 32)
    v = values.to(torch.int64)
    if runs * 32 != length:
        v = torch.nn.functional.pad(v, (0, runs * 32 - length))
    v = v.reshape(*lead, runs, 32)
    words = torch.zeros(*lead, runs, bits, dtype=torch.int64, device=values.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[..., word] |= (v[..., i] << shift) & (_WORD - 1)
        if shift + bits > 32:  # straddles: the high bits open the next word
            words[..., word + 1] |= v[..., i] >> (32 - shift)
    return words.reshape(*lead, runs * bits)[..., :-(-length * bits // 32)]


def unpack_words(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int64 [..., length] from unsigned or int32 words [..., >= ceil(length * bits / 32)]; inverse of pack_words."""
    *lead, n_words = words.shape
    runs = -(-length // 32)
    w = words.to(torch.int64) & (_WORD - 1)
    if runs * bits > n_words:
        w = torch.nn.functional.pad(w, (0, runs * bits - n_words))
    w = w[..., :runs * bits].reshape(*lead, runs, bits)
    out = torch.empty(*lead, runs, 32, dtype=torch.int64, device=words.device)
    mask = (1 << bits) - 1
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        x = w[..., word] >> shift
        if shift + bits > 32:
            x = x | (w[..., word + 1] << (32 - shift))
        out[..., i] = x & mask
    return out.reshape(*lead, runs * 32)[..., :length]


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32 (what safetensors stores)."""
    return torch.where(words >= 2 ** 31, words - _WORD, words).to(torch.int32)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_words, as int32."""
    return to_int32(pack_words(values, bits))


def values_per_word_run(bits: int) -> int:
    """Smallest count of values that fills whole int32 words: 16 at 2 bits, 32 at 3, 8 at 4, 4 at 8."""
    return 32 // math.gcd(bits, 32)


# ---- module names vLLM resolves that the checkpoint does not have -------------------------------------------

# vLLM's packed_modules_mapping for the families moeq supports: one fused linear loaded from these shards.
VLLM_FUSED_LINEAR = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek with q_lora_rank
}
# A routed expert's module: '<stack>.<e>.<proj>', loaded by vLLM as one FusedMoE layer named '<stack>'.
_EXPERT = re.compile(r"(.+\.experts)\.\d+\.")
# vLLM's compressed-tensors MoE method looks the scheme of '<stack>' up under these three names.
_CT_MOE_PROBES = ("0.gate_proj", "0.up_proj", "0.down_proj")


def engine_names(schemes: Mapping[str, Scheme | None],
                 fused: Mapping[str, tuple[str, ...]] = VLLM_FUSED_LINEAR) -> dict[str, Scheme | None]:
    """schemes plus the names vLLM resolves on top of the checkpoint's, each with its members' scheme.

    vLLM loads all experts of a layer as one FusedMoE module '<stack>' (its gptq loaders match `dynamic`
    against '<stack>', its compressed-tensors loader probes '<stack>.0.gate_proj' etc.), and fuses q/k/v
    (and gate/up outside the experts) into one linear. Members of one such module must share a scheme;
    FormatError names the first group that does not.
    """
    groups: dict[str, list[str]] = {}
    for name in schemes:
        m = _EXPERT.match(name)
        if m:
            stack = m.group(1)
            for virtual in (stack, *(f"{stack}.{probe}" for probe in _CT_MOE_PROBES)):
                groups.setdefault(virtual, []).append(name)
            continue
        parent, _, leaf = name.rpartition(".")
        for fused_name, shards in fused.items():
            if leaf in shards and all(f"{parent}.{s}" in schemes for s in shards):
                groups.setdefault(f"{parent}.{fused_name}", []).append(name)
    out = dict(schemes)
    for virtual, members in groups.items():
        first = schemes[members[0]]
        for member in members[1:]:
            if schemes[member] != first:
                raise FormatError(
                    f"vLLM loads {virtual} as one module from {len(members)} checkpoint modules, so they need "
                    f"one scheme: {members[0]} has {_describe(first)} but {member} has "
                    f"{_describe(schemes[member])} (give them one scheme, or pass vllm_groups=False for a "
                    f"checkpoint that only GPTQModel / compressed-tensors will load)")
        if virtual in schemes and schemes[virtual] != first:
            raise FormatError(f"{virtual} has {_describe(schemes[virtual])} but the modules vLLM fuses into it "
                              f"have {_describe(first)}")
        out[virtual] = first
    return out


def _describe(scheme: Scheme | None) -> str:
    if scheme is None:
        return "no quantization"
    return f"{scheme.bits}-bit group_size={scheme.group_size} {'sym' if scheme.sym else 'asym'}"


# ---- the regex cover --------------------------------------------------------------------------------------

_ANY_INT = r"\d+"


def ordered_cover(schemes: Mapping[str, Scheme | None], order: list) -> list[tuple[object, list[str]]]:
    """Regexes per scheme, in `order`, so that first-match resolution gives every name its scheme.

    A pattern `p(?:\\.|$)` covers module p and everything below it. It is taken for a subtree only when
    every name in that subtree has the scheme, and only at or below a layer or expert index (a component
    of digits), so siblings of another scheme and names outside the decoder layers (embed_tokens, norm)
    are never swept in. Merged alternatives of indices then widen to `\\d+` where that matches no name
    still unclaimed with another scheme: names that rules of order[:i] claimed resolve first anyway.
    Names of schemes left out of `order` are matched by no rule (GPTQ's base scheme).
    """
    unclaimed = dict(schemes)
    out = []
    for scheme in order:
        target = [n for n, s in unclaimed.items() if s == scheme]
        others = [n for n, s in schemes.items() if s != scheme]
        rest = [n for n, s in unclaimed.items() if s != scheme]
        patterns = _cover(target, others, rest) if target else []
        compiled = [re.compile(p) for p in patterns]
        claimed = [n for n in unclaimed if any(c.match(n) for c in compiled)]
        if sorted(claimed) != sorted(target):  # by construction; a failure here is a bug in _cover
            raise RuntimeError(f"regex cover for {_describe(scheme)} claims {sorted(set(claimed) ^ set(target))[:5]}")
        for n in claimed:
            del unclaimed[n]
        out.append((scheme, patterns))
    return out


def check_header_resolves(header: str, resolve: Callable[[str], Scheme | None],
                          names: Mapping[str, Scheme | None]) -> None:
    """Raise unless the written header's rules (`resolve`, the format's reader) give every module of `names`
    its planned scheme: by construction they do, so a mismatch is a bug in the cover."""
    for name, scheme in names.items():
        if resolve(name) != scheme:
            raise RuntimeError(f"{header} header resolves {name} to {resolve(name)}, expected {scheme}")


def _cover(target: list[str], others: list[str], rest: list[str]) -> list[str]:
    """Compact regexes matching every name in target and no name in rest (the unclaimed part of others)."""
    other_prefixes = {tuple(parts[:d]) for parts in (n.split(".") for n in others) for d in range(1, len(parts) + 1)}
    rules = set()
    for name in target:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = tuple(parts[:depth])
            whole_subtree_ok = prefix not in other_prefixes  # no other-scheme name at or below it
            if whole_subtree_ok and (depth == len(parts) or any(c.isdigit() for c in prefix)):
                rules.add((tuple(frozenset([c]) for c in prefix), False))
                break
        else:  # a name of another scheme lies below this one: match this name alone
            rules.add((tuple(frozenset([c]) for c in parts), True))
    rules = _merge(rules)
    generalized = set()
    for comps, exact in rules:
        comps = list(comps)
        for i, comp in enumerate(comps):
            if _ANY_INT not in comp and all(c.isdigit() for c in comp):
                trial = comps[:i] + [frozenset([_ANY_INT])] + comps[i + 1:]
                pattern = re.compile(_regex(trial, exact))
                if not any(pattern.match(n) for n in rest):
                    comps = trial
        generalized.add((tuple(comps), exact))
    patterns = {_regex(comps, exact): None for comps, exact in _merge(generalized)}
    compiled = {p: re.compile(p) for p in patterns}
    for p in sorted(patterns, key=len, reverse=True):  # drop patterns the others already cover
        rivals = [compiled[r] for r in patterns if r != p]
        if all(any(r.match(n) for r in rivals) for n in target if compiled[p].match(n)):
            del patterns[p]
    return sorted(patterns)


def _merge(rules: set) -> set:
    """Merge rules that differ in one component into one alternation; exact, since the rest is equal."""
    rules = set(rules)
    changed = True
    while changed:
        changed = False
        for i in range(max((len(c) for c, _ in rules), default=0)):
            buckets: dict[tuple, list] = {}
            for comps, exact in sorted(rules, key=lambda r: _regex(*r)):
                if len(comps) > i:
                    buckets.setdefault((len(comps), exact, comps[:i], comps[i + 1:]), []).append((comps, exact))
            for (_, exact, before, after), members in buckets.items():
                if len(members) > 1:
                    union = frozenset().union(*(c[i] for c, _ in members))
                    if _ANY_INT in union:  # \d+ absorbs the indices, not other names
                        union = frozenset(c for c in union if not c.isdigit())
                    rules.difference_update(members)
                    rules.add((before + (union,) + after, exact))
                    changed = True
    return rules


def _regex(comps, exact: bool) -> str:
    parts = []
    for comp in comps:
        alternatives = [_ANY_INT if c == _ANY_INT else re.escape(c) for c in sorted(comp, key=_index_order)]
        parts.append(alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")")
    return r"\.".join(parts) + ("$" if exact else r"(?:\.|$)")


def _index_order(c: str) -> tuple:
    """Indices first, in numeric order, then \\d+, then names."""
    return (0, int(c), "") if c.isdigit() else (1, 0, "") if c == _ANY_INT else (2, 0, c)


def count_schemes(schemes: Mapping[str, Scheme | None]) -> list[Scheme]:
    """Quantized schemes by how many modules use them, most first (ties: first seen first)."""
    counts: dict[Scheme, int] = {}
    for s in schemes.values():
        if s is not None:
            counts[s] = counts.get(s, 0) + 1
    return sorted(counts, key=lambda s: -counts[s])  # sorted is stable: ties keep first-seen order
