import random
import re

import pytest
import torch

from moeq.formats import FormatError, Scheme, gptq

from . import mixtral_map, qwen_map, random_quantized

CASES = [(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32, 128) for s in (True, False)]


# ---- tensors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits,group_size,sym", CASES)
def test_pack_unpack_round_trip_is_bit_exact(bits, group_size, sym, checkpoint_format):
    n, k = 64, 256
    q, scales, zeros = random_quantized(bits, group_size, sym, n, k)
    t = gptq.pack(q, scales, zeros, bits, group_size, sym, checkpoint_format=checkpoint_format)
    groups = 1 if group_size == -1 else k // group_size
    assert {name: (v.dtype, tuple(v.shape)) for name, v in t.items()} == {
        "qweight": (torch.int32, (k * bits // 32, n)),
        "qzeros": (torch.int32, (groups, n * bits // 32)),
        "scales": (torch.float16, (groups, n)),
        "g_idx": (torch.int32, (k,)),
    }
    assert torch.equal(t["g_idx"], torch.arange(k, dtype=torch.int32) // (k // groups))
    q2, scales2, zeros2 = gptq.unpack(t, bits, group_size, sym, checkpoint_format=checkpoint_format)
    assert torch.equal(q2, q) and torch.equal(scales2, scales) and torch.equal(zeros2, zeros)
    assert q2.dtype == torch.uint8 and zeros2.dtype == torch.uint8


def _field(words, bits, i):
    """Value i of a run of int32 words, per element from GPTQ's published layout (AutoGPTQ pack)."""
    if bits in (2, 4, 8):
        per_word = 32 // bits
        return ((words[i // per_word] & 0xFFFFFFFF) >> (bits * (i % per_word))) & ((1 << bits) - 1)
    # 3 bits: 32 values in 3 words. Word 0: values 0-9 at bits 0, 3, .., 27, value 10's low 2 bits at 30-31;
    # word 1: value 10's high bit at bit 0, values 11-20 at bits 1, 4, .., 28, value 21's low bit at 31;
    # word 2: value 21's high 2 bits at bits 0-1, values 22-31 at bits 2, 5, .., 29.
    w0, w1, w2 = (words[3 * (i // 32) + j] & 0xFFFFFFFF for j in range(3))
    j = i % 32
    if j < 10:
        return (w0 >> (3 * j)) & 7
    if j == 10:
        return (w0 >> 30) | ((w1 & 1) << 2)
    if j < 21:
        return (w1 >> (3 * (j - 11) + 1)) & 7
    if j == 21:
        return (w1 >> 31) | ((w2 & 3) << 1)
    return (w2 >> (3 * (j - 22) + 2)) & 7


def _reference_read(t, bits, checkpoint_format):
    """(q, zeros) as nested lists, element by element; v1 zeros as GPTQModel reads them on load."""
    qweight, qzeros = t["qweight"].tolist(), t["qzeros"].tolist()
    k, n = len(qweight) * 32 // bits, len(qweight[0])
    q = [[_field([row[c] for row in qweight], bits, r) for r in range(k)] for c in range(n)]
    ones = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
    zeros = []
    for row in qzeros:  # one group
        if checkpoint_format == "gptq" and bits != 3:  # GPTQModel: qzeros += 0x11111111 (word arithmetic)
            row = [((w & 0xFFFFFFFF) + ones[bits]) % 2 ** 32 for w in row]
        fields = [_field(row, bits, c) for c in range(n)]
        if checkpoint_format == "gptq" and bits == 3:  # GPTQModel: each 3-bit field + 1, modulo 8
            fields = [(f + 1) % 8 for f in fields]
        zeros.append(fields)
    return q, [list(col) for col in zip(*zeros)]  # zeros as [N][G]


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_independent_reader_agrees_with_pack(bits, sym, checkpoint_format):
    n, k = 32, 64
    q, scales, zeros = random_quantized(bits, 32, sym, n, k, seed=bits)
    t = gptq.pack(q, scales, zeros, bits, 32, sym, checkpoint_format=checkpoint_format)
    ref_q, ref_zeros = _reference_read(t, bits, checkpoint_format)
    assert ref_q == q.tolist()
    assert ref_zeros == zeros.tolist()
    assert t["scales"].tolist() == scales.t().tolist()


@pytest.mark.parametrize("bits,word", [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_v1_qzeros_are_the_well_known_constants(bits, word):
    # zero 2**(bits-1), stored as zero - 1 in every field: what AutoGPTQ/GPTQModel sym checkpoints hold.
    q, scales, zeros = random_quantized(bits, 32, True, 32, 64)
    t = gptq.pack(q, scales, zeros, bits, 32, True)
    assert (t["qzeros"] == word).all()
    v2 = gptq.pack(q, scales, zeros, bits, 32, True, checkpoint_format="gptq_v2")
    assert (v2["qzeros"].to(torch.int64) & 0xFFFFFFFF == {2: 0xAAAAAAAA, 4: 0x88888888, 8: 0x80808080}[bits]).all()


def test_v1_zero_of_zero_is_stored_with_gptqmodel_word_arithmetic():
    # zeros 0,5,1,2,3,4,6,7 pack to 0x76432150; v1 stores 0x76432150 - 0x11111111 = 0x6532103F (the borrow
    # from field 0 lowers field 1), which GPTQModel's load (+ 0x11111111) turns back into the zeros.
    zeros = torch.tensor([[0], [5], [1], [2], [3], [4], [6], [7]], dtype=torch.uint8)
    q = torch.zeros(8, 32, dtype=torch.uint8)
    t = gptq.pack(q, torch.ones(8, 1).half(), zeros, 4, -1, False)
    assert t["qzeros"].tolist() == [[0x6532103F]]
    assert torch.equal(gptq.unpack(t, 4, -1, False)[2], zeros)


def test_leading_dims_pack_slice_by_slice():
    q, scales, zeros = random_quantized(4, 32, False, 16, 64, lead=(3,))
    batched = gptq.pack(q, scales, zeros, 4, 32, False)
    for e in range(3):
        one = gptq.pack(q[e], scales[e], zeros[e], 4, 32, False)
        assert all(torch.equal(batched[name][e], one[name]) for name in one)
    assert all(torch.equal(a, b) for a, b in zip(gptq.unpack(batched, 4, 32, False), (q, scales, zeros)))


def test_errors_name_the_problem():
    q, scales, zeros = random_quantized(4, 32, True, 32, 64)
    with pytest.raises(FormatError, match="bits=5"):
        gptq.pack(q, scales, zeros, 5, 32, True)
    with pytest.raises(FormatError, match="does not divide K=64"):
        gptq.pack(q, scales[:, :1], zeros[:, :1], 4, 48, True)
    with pytest.raises(FormatError, match=r"N \(out features\) must be a multiple of 8, got 12"):
        gptq.pack(q[:12], scales[:12], zeros[:12], 4, 32, True)
    q3, s3, z3 = random_quantized(3, 16, True, 32, 48)
    with pytest.raises(FormatError, match=r"K \(in features\) must be a multiple of 32, got 48"):
        gptq.pack(q3, s3, z3, 3, 16, True)
    with pytest.raises(FormatError, match="q holds 16"):
        gptq.pack(q.clone().fill_(16), scales, zeros, 4, 32, True)
    with pytest.raises(FormatError, match="symmetric 4-bit scheme stores zero = 8"):
        gptq.pack(q, scales, zeros - 1, 4, 32, True)
    with pytest.raises(FormatError, match="checkpoint_format='marlin'"):
        gptq.pack(q, scales, zeros, 4, 32, True, checkpoint_format="marlin")

    t = gptq.pack(q, scales, zeros, 4, 32, True)
    with pytest.raises(FormatError, match=r"'qzeros' must be torch.int32 of shape \(2, 4\)"):
        gptq.unpack({**t, "qzeros": t["qzeros"][:1]}, 4, 32, True)
    with pytest.raises(FormatError, match=r"'scales' must be torch.float16 of shape \(2, 32\).*got torch.float32"):
        gptq.unpack({**t, "scales": t["scales"].float()}, 4, 32, True)
    with pytest.raises(FormatError, match="'qweight' must be int32"):
        gptq.unpack({**t, "qweight": t["qweight"].to(torch.int64)}, 4, 32, True)
    with pytest.raises(FormatError, match="act-order"):
        gptq.unpack({**t, "g_idx": t["g_idx"].flip(0)}, 4, 32, True)
    with pytest.raises(FormatError, match="does not divide K=64"):
        gptq.unpack(t, 4, 48, True)
    with pytest.raises(FormatError, match="sym=True but qzeros"):
        gptq.unpack(t, 4, 32, True, checkpoint_format="gptq_v2")  # v1 zeros read as v2: 7, not 8


# ---- the header: resolved the way vLLM resolves it -------------------------------------------------------

def vllm_resolve(cfg, prefix):
    """vLLM gptq_utils: lm_head only when cfg['lm_head']; then `dynamic` in order, first re.match on the
    prefix: '-:' -> unquantized, '+:' (or no sign) -> its keys override the base config."""
    if prefix.split(".")[-1] == "lm_head" and not cfg.get("lm_head", False):
        return None
    base = {"bits": cfg["bits"], "group_size": cfg["group_size"], "sym": cfg["sym"]}
    for key, overrides in cfg.get("dynamic", {}).items():
        if key.startswith("-:"):
            if re.match(key[2:], prefix):
                return None
        elif re.match(key.removeprefix("+:"), prefix):
            return Scheme(**{**base, **overrides})
    return Scheme(**base)


def vllm_names(pm):
    """The prefixes vLLM asks about on top of the checkpoint's: fused q/k/v, gate/up, each expert stack."""
    extra = {}
    for name, scheme in pm.items():
        if ".self_attn.q_proj" in name:
            extra[name.replace("q_proj", "qkv_proj")] = scheme
        if ".shared_expert.gate_proj" in name:
            extra[name.replace("gate_proj", "gate_up_proj")] = scheme
        if re.search(r"\.experts\.\d+\.", name):
            extra[re.sub(r"\.experts\.\d+\..*", ".experts", name)] = scheme
    return extra


def test_mixtral_header_is_compact_and_exact():
    pm = mixtral_map()
    cfg = gptq.quantization_config(pm)
    assert cfg == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False,
        "dynamic": {
            r"-:lm_head(?:\.|$)": {},
            r"-:model\.layers\.3(?:\.|$)": {},
            r"-:model\.layers\.\d+\.block_sparse_moe\.gate(?:\.|$)": {},
            r"+:model\.layers\.\d+\.self_attn(?:\.|$)": {"bits": 8, "group_size": -1, "sym": True},
        },
    }
    for name, scheme in {**pm, **vllm_names(pm)}.items():
        assert vllm_resolve(cfg, name) == scheme, name


@pytest.mark.parametrize("make_map", [mixtral_map, qwen_map])
def test_every_module_and_vllm_name_resolves_to_its_scheme(make_map):
    pm = make_map()
    cfg = gptq.quantization_config(pm, checkpoint_format="gptq_v2")
    assert cfg["checkpoint_format"] == "gptq_v2"
    assert cfg["lm_head"] == (pm["lm_head"] is not None)
    ours = gptq.read_quantization_config(cfg)
    for name, scheme in {**pm, **vllm_names(pm)}.items():
        assert vllm_resolve(cfg, name) == scheme, name
        assert ours(name) == scheme, name
    assert len(cfg["dynamic"]) <= 12  # one rule per (role, scheme), not one per module


@pytest.mark.parametrize("seed", range(4))
def test_random_per_expert_maps_resolve_exactly(seed):
    # Without vLLM's grouping every module may differ (GPTQModel loads per module): the cover stays exact.
    rng = random.Random(seed)
    pool = [None, Scheme(4, 128, True), Scheme(8, -1, True), Scheme(2, 32, False), Scheme(3, 64, True)]
    pm = {}
    for layer in range(12):
        pm[f"model.layers.{layer}.mlp.gate"] = rng.choice(pool[:2])
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            pm[f"model.layers.{layer}.self_attn.{p}"] = rng.choice(pool)
        for e in range(6):
            for p in ("gate_proj", "up_proj", "down_proj"):
                pm[f"model.layers.{layer}.mlp.experts.{e}.{p}"] = rng.choice(pool[1:] if e % 2 else pool)
    cfg = gptq.quantization_config(pm, vllm_groups=False)
    for name, scheme in pm.items():
        assert vllm_resolve(cfg, name) == scheme, name


def test_vllm_fused_modules_must_share_a_scheme():
    pm = mixtral_map()
    pm["model.layers.0.self_attn.k_proj"] = Scheme(4, 128, True)
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.qkv_proj"):
        gptq.quantization_config(pm)
    pm = mixtral_map()
    pm["model.layers.1.block_sparse_moe.experts.5.w2"] = Scheme(8, 128, True)
    with pytest.raises(FormatError, match=r"model\.layers\.1\.block_sparse_moe\.experts .*experts\.5\.w2"):
        gptq.quantization_config(pm)
    cfg = gptq.quantization_config(pm, vllm_groups=False)  # GPTQModel resolves per module
    assert vllm_resolve(cfg, "model.layers.1.block_sparse_moe.experts.5.w2") == Scheme(8, 128, True)
    assert vllm_resolve(cfg, "model.layers.1.block_sparse_moe.experts.5.w1") == Scheme(4, 128, True)


def test_header_errors():
    with pytest.raises(FormatError, match="not 5"):
        gptq.quantization_config({"model.layers.0.mlp.down_proj": (5, 128, True)})
    with pytest.raises(FormatError, match="no module is quantized"):
        gptq.quantization_config({"model.layers.0.mlp.down_proj": None})
    with pytest.raises(FormatError, match="not 'gptq'"):
        gptq.read_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 128, "sym": True})
