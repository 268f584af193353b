import random
import re

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import match_name

from moeq.formats import FormatError, Scheme
from moeq.formats import compressed_tensors as ct

from . import mixtral_map, qwen_map, random_quantized

# (bits, group_size, sym, N, K): odd N everywhere, odd K where the group size allows it
CASES = [(b, g, s, 37, {-1: 77, 32: 96, 128: 256}[g]) for b in (2, 3, 4, 8) for g in (-1, 32, 128)
         for s in (True, False)]


def per_column(params, k):
    return params.float().repeat_interleave(k // params.shape[-1], dim=-1)


def dequantize(q, scales, zeros):
    """moeq's convention in float32: (q - zero) * scale, group by group."""
    k = q.shape[-1]
    return (q.float() - per_column(zeros, k)) * per_column(scales, k)


# ---- tensors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,sym,n,k", CASES)
def test_pack_unpack_round_trip_is_bit_exact(bits, group_size, sym, n, k):
    q, scales, zeros = random_quantized(bits, group_size, sym, n, k)
    t = ct.pack(q, scales, zeros, bits, group_size, sym)
    groups = 1 if group_size == -1 else k // group_size
    expected = {
        "weight_packed": (torch.int32, (n, -(-k * bits // 32))),
        "weight_scale": (torch.float16, (n, groups)),
        "weight_shape": (torch.int64, (2,)),
    }
    if not sym:
        expected["weight_zero_point"] = (torch.int32, (-(-n * bits // 32), groups))
    assert {name: (v.dtype, tuple(v.shape)) for name, v in t.items()} == expected
    assert t["weight_shape"].tolist() == [n, k]
    q2, scales2, zeros2 = ct.unpack(t, bits, group_size, sym)
    assert torch.equal(q2, q) and torch.equal(scales2, scales) and torch.equal(zeros2, zeros)


def _read_stream(words, bits, i):
    """Element i of a row of int32 words: its bits start at global bit i * bits, low word first."""
    start = i * bits
    word, shift = divmod(start, 32)
    value = (words[word] & 0xFFFFFFFF) >> shift
    if shift + bits > 32:
        value |= (words[word + 1] & 0xFFFFFFFF) << (32 - shift)
    return value & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_independent_reader_agrees_with_pack(bits):
    n, k = 13, 75
    q, scales, zeros = random_quantized(bits, -1, False, n, k, seed=bits)
    t = ct.pack(q, scales, zeros, bits, -1, False)
    packed = t["weight_packed"].tolist()
    assert [[_read_stream(row, bits, i) for i in range(k)] for row in packed] == q.tolist()
    zp_columns = t["weight_zero_point"].t().tolist()  # [G][words along N]
    assert [[_read_stream(col, bits, i) for col in zp_columns] for i in range(n)] == zeros.tolist()


def test_leading_dims_pack_slice_by_slice():
    q, scales, zeros = random_quantized(4, 32, False, 10, 64, lead=(3,))
    batched = ct.pack(q, scales, zeros, 4, 32, False)
    assert batched["weight_shape"].tolist() == [3, 10, 64]
    for e in range(3):
        one = ct.pack(q[e], scales[e], zeros[e], 4, 32, False)
        assert all(torch.equal(batched[name][e], one[name]) for name in one if name != "weight_shape")
    assert all(torch.equal(a, b) for a, b in zip(ct.unpack(batched, 4, 32, False), (q, scales, zeros)))


@pytest.mark.parametrize("bits,group_size,sym,n,k", CASES)
def test_compressed_tensors_writes_and_reads_the_same_tensors(bits, group_size, sym, n, k):
    # The scheme comes from our header, parsed by compressed-tensors itself.
    q, scales, zeros = random_quantized(bits, group_size, sym, n, k)
    cfg = ct.quantization_config({"model.layers.0.mlp.down_proj": Scheme(bits, group_size, sym)})
    (scheme,) = QuantizationConfig.model_validate(cfg).config_groups.values()
    ours = ct.pack(q, scales, zeros, bits, group_size, sym)
    w = dequantize(q, scales, zeros)  # exact in float32: an 8-bit integer times a float16

    # its compressor, fed W, the scales and its signed zero points, writes bit-identical tensors
    signed_zero = (zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scales, "weight_zero_point": signed_zero}, scheme)
    assert set(theirs) == set(ours)
    for name in ours:
        assert theirs[name].dtype == ours[name].dtype and torch.equal(theirs[name], ours[name]), name

    # its decompressor reads our tensors back to our weights; it returns float16 (the scale dtype), so
    # each value is rounded once: at most half an ulp, 2**-11 relative
    back = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    assert back.dtype == torch.float16
    torch.testing.assert_close(back.float(), w, rtol=2 ** -11, atol=0)


def test_errors_name_the_problem():
    q, scales, zeros = random_quantized(4, 32, False, 8, 64)
    with pytest.raises(FormatError, match="not bits=5"):
        ct.pack(q, scales, zeros, 5, 32, False)
    with pytest.raises(FormatError, match="does not divide K=64"):
        ct.pack(q, scales[:, :1], zeros[:, :1], 4, 48, False)
    with pytest.raises(FormatError, match=r"scales must be torch.float16 of shape \(8, 2\)"):
        ct.pack(q, scales.float(), zeros, 4, 32, False)
    t = ct.pack(q, scales, zeros, 4, 32, False)
    with pytest.raises(FormatError, match=r"'weight_packed' must be torch.int32 of shape \(8, 8\)"):
        ct.unpack({**t, "weight_packed": t["weight_packed"][:, :7]}, 4, 32, False)
    with pytest.raises(FormatError, match=r"'weight_scale' must be torch.float16 of shape \(8, 2\).*bfloat16"):
        ct.unpack({**t, "weight_scale": t["weight_scale"].bfloat16()}, 4, 32, False)
    with pytest.raises(FormatError, match=r"'weight_zero_point' is missing \(expected torch.int32 \(1, 2\)"):
        ct.unpack({name: v for name, v in t.items() if name != "weight_zero_point"}, 4, 32, False)
    with pytest.raises(FormatError, match="present but the scheme is symmetric"):
        ct.unpack(t, 4, 32, True)
    with pytest.raises(FormatError, match="'weight_shape' is missing"):
        ct.unpack({"weight_packed": t["weight_packed"]}, 4, 32, False)


# ---- the header: resolved the way vLLM and compressed-tensors resolve it -----------------------------------

FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _hit(target, name):
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def vllm_resolve(cfg, name):
    """vLLM CompressedTensorsConfig.get_scheme_dict: a fused name is ignored when its shards are; then
    the first target (config groups in order) matching the name, else one matching all its shards."""
    *parent, leaf = name.split(".")
    shards = [".".join(parent + [s]) for s in FUSED.get(leaf, [leaf])]
    if all(any(_hit(t, s) for t in cfg["ignore"]) for s in shards):
        return None
    targets = [(t, g["weights"]) for g in cfg["config_groups"].values() for t in g["targets"]]
    hit = next((w for t, w in targets if _hit(t, name)), None)
    if hit is None:
        per_shard = [next((w for t, w in targets if _hit(t, s)), None) for s in shards]
        hit = per_shard[0] if all(per_shard) else None
    if hit is None:
        return None
    return Scheme(hit["num_bits"], hit["group_size"] or -1, hit["symmetric"])


def vllm_moe_resolve(cfg, stack):
    """vLLM CompressedTensorsMoEMethod: the stack's scheme is looked up as '<stack>.0.gate_proj' etc."""
    found = {vllm_resolve(cfg, f"{stack}.0.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
    assert len(found) == 1, f"vLLM raises: MoE projections of {stack} resolve to {found}"
    return found.pop()


def compressed_tensors_resolve(qc: QuantizationConfig, name):
    """compressed-tensors apply_quantization_config: ignore wins, then the first matching target."""
    if any(match_name(name, t) for t in qc.ignore or []):
        return None
    for scheme in qc.config_groups.values():
        if any(match_name(name, t) for t in scheme.targets):
            w = scheme.weights
            return Scheme(w.num_bits, w.group_size or -1, w.symmetric)
    return None


def test_mixtral_header_is_compact_and_exact():
    pm = mixtral_map()
    cfg = ct.quantization_config(pm)
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["quantization_status"] == "compressed"
    assert cfg["ignore"] == [r"re:lm_head(?:\.|$)", r"re:model\.layers\.3(?:\.|$)",
                             r"re:model\.layers\.\d+\.block_sparse_moe\.gate(?:\.|$)"]
    assert [(g["targets"], g["weights"]) for g in cfg["config_groups"].values()] == [
        ([r"re:model\.layers\.\d+\.self_attn(?:\.|$)"],
         {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
          "dynamic": False, "actorder": None}),
        ([r"re:model\.layers\.\d+\.block_sparse_moe\.experts(?:\.|$)"],
         {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
          "dynamic": False, "actorder": None}),
    ]


@pytest.mark.parametrize("make_map", [mixtral_map, qwen_map])
def test_every_module_and_vllm_name_resolves_to_its_scheme(make_map):
    pm = make_map()
    cfg = ct.quantization_config(pm)
    qc = QuantizationConfig.model_validate(cfg)  # compressed-tensors accepts the header
    ours = ct.read_quantization_config(cfg)
    for name, scheme in pm.items():
        assert vllm_resolve(cfg, name) == scheme, name
        assert compressed_tensors_resolve(qc, name) == scheme, name
        assert ours(name) == scheme, name
    for name, scheme in pm.items():
        parent, _, leaf = name.rpartition(".")
        if leaf == "q_proj":
            assert vllm_resolve(cfg, f"{parent}.qkv_proj") == scheme, name
        if leaf == "gate_proj" and ".experts." not in name:
            assert vllm_resolve(cfg, f"{parent}.gate_up_proj") == scheme, name
        m = re.match(r"(.+\.experts)\.\d+\.", name)
        if m:
            assert vllm_moe_resolve(cfg, m.group(1)) == scheme, name


@pytest.mark.parametrize("seed", range(4))
def test_random_per_expert_maps_resolve_exactly(seed):
    rng = random.Random(seed)
    pool = [None, Scheme(4, 128, True), Scheme(8, -1, True), Scheme(4, 32, False), Scheme(8, 64, False)]
    pm = {f"model.layers.{layer}.mlp.experts.{e}.{p}": rng.choice(pool)
          for layer in range(10) for e in range(6) for p in ("gate_proj", "up_proj", "down_proj")}
    pm.update({f"model.layers.{layer}.self_attn.o_proj": rng.choice(pool) for layer in range(10)})
    cfg = ct.quantization_config(pm, vllm_groups=False)
    qc = QuantizationConfig.model_validate(cfg)
    for name, scheme in pm.items():
        assert vllm_resolve(cfg, name) == scheme, name
        assert compressed_tensors_resolve(qc, name) == scheme, name


def test_vllm_moe_stack_must_share_a_scheme():
    pm = mixtral_map()
    pm["model.layers.0.block_sparse_moe.experts.0.w3"] = Scheme(8, 128, True)
    with pytest.raises(FormatError, match=r"model\.layers\.0\.block_sparse_moe\.experts"):
        ct.quantization_config(pm)


def test_header_errors():
    with pytest.raises(FormatError, match="not 6"):
        ct.quantization_config({"model.layers.0.mlp.down_proj": (6, 128, True)})
    with pytest.raises(FormatError, match="no module is quantized"):
        ct.quantization_config({"model.layers.0.mlp.down_proj": None})
    cfg = ct.quantization_config({"model.layers.0.mlp.down_proj": (4, 128, True)})
    with pytest.raises(FormatError, match="not packed"):
        ct.read_quantization_config({**cfg, "quantization_status": "frozen"})
    group = cfg["config_groups"]["group_0"]
    with pytest.raises(FormatError, match="group_0.*not an integer weight-only pack-quantized"):
        ct.read_quantization_config({**cfg, "config_groups": {"group_0": {**group, "format": "float-quantized"}}})
