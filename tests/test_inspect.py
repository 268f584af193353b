import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq.checkpoint import quantization_config, stored_tensors
from moeq.inspect import add_cli, inspect_checkpoint, render_inspection
from moeq.inventory import inventory_from_checkpoint
from moeq.loader import StoredCheckpoint
from moeq.plan import make_plan
from moeq.quantize import QuantizeConfig, quantize_model
from moeq.recipe import load_recipe

from support import FIXTURES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO = EXAMPLES / "demo-mixtral"  # 4 layers, 8 experts [256, 128] / [128, 256], tied embeddings
EXPERT = "model.layers.1.block_sparse_moe.experts.3"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """The demo through `moeq quantize` (mixtral recipe: attention int8 per channel, experts int4 g128; RTN and
    two windows, to be quick), GPTQ format."""
    out = tmp_path_factory.mktemp("q") / "gptq"
    plan = make_plan(inventory_from_checkpoint(DEMO), load_recipe("mixtral", ["defaults.method=rtn"]))
    config = QuantizeConfig(calib=EXAMPLES / "calib.txt", out=out, calib_samples=2, seq_len=32, device="cpu")
    quantize_model(plan, config, log=lambda *a: None)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _kinds(inspection) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in inspection.problems:
        out.setdefault(p.kind, []).append(p.where)
    return out


def test_clean_checkpoint_table_sizes_loader_view_and_sidecar(quantized):
    inspection = inspect_checkpoint(quantized)
    assert inspection.problems == ()
    schemes = {s.tensor.name: s.scheme for s in inspection.stored}
    assert schemes[f"{EXPERT}.w2.weight"] == (4, 128, True)
    assert schemes["model.layers.0.self_attn.q_proj.weight"] == (8, -1, True)
    assert schemes["model.layers.0.block_sparse_moe.gate.weight"] is None
    expert = next(s for s in inspection.stored if s.tensor.name == f"{EXPERT}.w2.weight")
    # qweight [256 * 4 / 32, 128] + qzeros [2, 16] int32, scales [2, 128] fp16, g_idx [256] int32
    assert expert.parts == tuple(f"{EXPERT}.w2.{s}" for s in ("qweight", "qzeros", "scales", "g_idx"))
    assert expert.nbytes == 32 * 128 * 4 + 2 * 16 * 4 + 2 * 128 * 2 + 256 * 4
    sizes = {r["role"]: r for r in inspection.role_sizes()}
    assert sizes["expert"]["params"] == 4 * 8 * 3 * 256 * 128
    gate = next(s for s in inspection.stored if s.tensor.name == f"{EXPERT}.w1.weight")
    assert gate.nbytes == 16 * 256 * 4 + 1 * 32 * 4 + 1 * 256 * 2 + 128 * 4  # K = 128: one group
    assert sizes["expert"]["bytes"] == 32 * (2 * gate.nbytes + expert.nbytes)
    assert sizes["embed"]["bytes"] == sizes["embed"]["bf16_bytes"] == 2 * 8192 * 128
    assert inspection.file_bytes == sum(p.stat().st_size for p in quantized.glob("*.safetensors"))
    text = render_inspection(inspection)
    assert "recipe: stored in checkpoint" in text
    assert "0-3     expert  gate,up,down  96       3.15M    int4 g128 sym" in text
    assert "0-3     attn    q,k,v,o       16       196.61K  int8 ch sym" in text
    assert "expert  96       3.15M    1.70 MB    6.29 MB    0.27x  4.32" in text  # bytes on disk
    assert "quant_method gptq, checkpoint_format gptq (v1: zero points stored minus 1), desc_act false" in text
    assert "base: int4 g128 sym (modules no dynamic rule matches: 96)" in text
    assert r"-:model\.layers\.\d+\.block_sparse_moe\.gate(?:\.|$)  -> kept, 4 module(s)" in text
    assert r"+:model\.layers\.\d+\.self_attn(?:\.|$)  -> int8 ch sym, 16 module(s)" in text
    assert "moeq.json: moeq 0.1.0, format gptq, recipe: Mixtral - routed experts int4 g128" in text
    assert "perplexity: not measured (quantized without --eval)" in text
    flags = json.loads((quantized / "moeq.json").read_text())["report"]["flags"]
    assert f"  flags: {len(flags)}" in text and all(f"    {f}" in text for f in flags)
    assert text.endswith("no problems: every tensor is where config.json and its quantization_config say, "
                         "of the shape they imply")
    assert inspect_checkpoint(quantized, verify=True).problems == ()


def test_sidecar_perplexity(quantized, tmp_path):
    copy = _copy(quantized, tmp_path / "ppl")
    _edit_json(copy / "moeq.json", lambda s: s["report"].update(perplexity={"before": 34.07, "after": 35.1}))
    assert "  perplexity: 34.070 -> 35.100 (+3.02%)" in render_inspection(inspect_checkpoint(copy))


def test_plain_bf16_checkpoint_is_all_kept():
    inspection = inspect_checkpoint(DEMO)
    assert inspection.problems == ()
    assert all(s.scheme is None and s.parts == (s.tensor.name,) for s in inspection.stored)
    assert len(inspection.stored) == 126
    text = render_inspection(inspection)
    assert "0-3     expert  gate,up,down  96       3.15M    kept bf16  16.00" in text
    assert "total   126      4.40M    8.79 MB    8.79 MB    1.00x  16.00" in text
    assert "loader view: no quantization_config" in text and "moeq.json: none" in text
    qwen = inspect_checkpoint(FIXTURES / "tiny-qwen2-moe")  # sharded, untied lm_head, shared experts, qkv bias
    assert qwen.problems == ()
    assert {r["role"] for r in qwen.role_sizes()} == {"embed", "attn", "router", "router_gate", "expert",
                                                      "shared_expert", "norm", "lm_head"}


def test_compressed_tensors_checkpoint(quantized, tmp_path):
    """The same weights repacked as compressed-tensors: one config group per scheme, the routers ignored."""
    source = StoredCheckpoint(quantized)
    tensors, per_module = {}, {}
    for t in source.inventory.tensors:
        q = source.packed(t)
        tensors.update(stored_tensors("compressed-tensors", t, None if q else source.read(t), q))
        if t.quantizable:
            per_module[t.module] = q.fmt if q else None
    out = tmp_path / "ct"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    shutil.copy(quantized / "config.json", out / "config.json")
    _edit_json(out / "config.json",
               lambda c: c.update(quantization_config=quantization_config("compressed-tensors", per_module)))
    inspection = inspect_checkpoint(out)
    assert inspection.problems == ()
    text = render_inspection(inspection)
    assert "loader view: quant_method compressed-tensors, format pack-quantized" in text
    assert "ignore: kept, 4 module(s)" in text
    assert "int8 ch sym, 16 module(s)" in text and "int4 g128 sym, 96 module(s)" in text

    shutil.copy(quantized / "moeq.json", out / "moeq.json")  # says gptq
    assert [p.message for p in inspect_checkpoint(out).problems] == [
        "moeq.json says moeq wrote format 'gptq', but config.json's quant_method is 'compressed-tensors'"]

    shape = f"{EXPERT}.w1.weight_shape"
    tensors[shape] = torch.tensor([256, 64])
    save_file(tensors, str(out / "model.safetensors"))
    (out / "moeq.json").unlink()
    (problem,) = inspect_checkpoint(out).problems
    assert problem.where == f"{EXPERT}.w1" and "weight_shape says [256, 64]" in problem.message


def test_header_bits_disagree_with_every_packed_expert(quantized, tmp_path):
    broken = _copy(quantized, tmp_path / "bits")
    _edit_json(broken / "config.json", lambda c: c["quantization_config"].update(bits=8))  # tensors hold 4
    inspection = inspect_checkpoint(broken)
    assert {p.kind for p in inspection.problems} == {"shape"}
    assert len(inspection.problems) == 96  # every expert module, not just the first
    (problem,) = [p for p in inspection.problems if p.where == f"{EXPERT}.w2"]
    assert problem.message == (
        f"{EXPERT}.w2: the header says int8 g128 sym, which for a [128, 256] weight disagrees with the stored "
        "parts: qweight is I32 [32, 128], needs I32 [64, 128] (its rows hold 4-bit values); "
        "qzeros is I32 [2, 16], needs I32 [2, 32]")


def test_every_problem_is_reported_not_just_the_first(quantized, tmp_path):
    broken = _copy(quantized, tmp_path / "broken")
    index_path = broken / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"]
    # 1. a packed part dropped from the index (still in its shard)
    del weight_map[f"{EXPERT}.w2.qzeros"]
    # 2. a kept tensor of the wrong shape, 3. a tensor nothing explains (expert 8 of 8)
    shard = weight_map["model.norm.weight"]
    tensors = load_file(str(broken / shard))
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:64].clone()
    tensors["model.layers.0.block_sparse_moe.experts.8.w1.weight"] = torch.zeros(256, 128, dtype=torch.bfloat16)
    weight_map["model.layers.0.block_sparse_moe.experts.8.w1.weight"] = shard
    save_file(tensors, str(broken / shard))
    # 4. a whole shard missing
    lost = weight_map["model.layers.2.self_attn.q_proj.qweight"]
    (broken / lost).unlink()
    _edit_json(index_path, lambda index: index.update(weight_map=weight_map))

    inspection = inspect_checkpoint(broken)
    assert _kinds(inspection) == {
        "shard": [lost],
        "missing": [f"{EXPERT}.w2"],
        "shape": ["model.norm.weight"],
        "unexplained": ["model.layers.0.block_sparse_moe.experts.8.w1"],
    }
    messages = {p.kind: p.message for p in inspection.problems}
    assert messages["missing"] == (f"{EXPERT}.w2: the header says int4 g128 sym; qzeros missing "
                                   f"(model-00002-of-00005.safetensors holds qzeros, but the index does not list it)")
    assert messages["shape"] == "model.norm.weight is BF16 [64], config.json implies [128]"
    assert messages["unexplained"].endswith("expert 8, but config.json has 8 experts")
    assert messages["shard"].startswith(f"{lost}: the index names it for ")


def test_packed_where_the_header_keeps_and_kept_where_it_packs(quantized, tmp_path):
    broken = _copy(quantized, tmp_path / "swap")
    # the header now keeps attention and quantizes the routers: both disagree with what is stored
    _edit_json(broken / "config.json", lambda c: c["quantization_config"].update(dynamic={
        r"-:model\.layers\.\d+\.self_attn(?:\.|$)": {}}))
    inspection = inspect_checkpoint(broken)
    assert {p.kind for p in inspection.problems} == {"header"}
    by_where = {p.where: p.message for p in inspection.problems}
    assert len(by_where) == 16 + 4
    assert by_where["model.layers.0.self_attn.q_proj"] == (
        "model.layers.0.self_attn.q_proj: the quantization_config keeps it unquantized (gptq), but the checkpoint "
        "holds it packed (qweight, qzeros, scales, g_idx)")
    assert by_where["model.layers.3.block_sparse_moe.gate"] == (
        "model.layers.3.block_sparse_moe.gate: the header says int4 g128 sym, but it is stored unquantized "
        "(model.layers.3.block_sparse_moe.gate.weight, BF16 [8, 128])")


def test_verify_reads_what_headers_cannot_show(quantized, tmp_path):
    broken = _copy(quantized, tmp_path / "g_idx")
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = broken / weight_map[f"{EXPERT}.w2.g_idx"]
    tensors = load_file(str(shard))
    tensors[f"{EXPERT}.w2.g_idx"] = tensors[f"{EXPERT}.w2.g_idx"].flip(0).contiguous()  # act-order permutation
    save_file(tensors, str(shard))
    assert inspect_checkpoint(broken).problems == ()  # shapes and dtypes are right
    (problem,) = inspect_checkpoint(broken, verify=True).problems
    assert problem.kind == "data" and problem.where == f"{EXPERT}.w2" and "g_idx" in problem.message


def test_cli_exit_status(quantized, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moeq")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", str(quantized), "--json", str(tmp_path / "clean.json")])
    args.func(args)  # no problems: returns, exit status 0
    assert "no problems" in capsys.readouterr().out
    assert json.loads((tmp_path / "clean.json").read_text())["problems"] == []

    broken = _copy(quantized, tmp_path / "bits")
    _edit_json(broken / "config.json", lambda c: c["quantization_config"].update(bits=8))
    args = parser.parse_args(["inspect", str(broken), "--json", str(tmp_path / "broken.json")])
    with pytest.raises(SystemExit) as exit_info:
        args.func(args)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "96 problem(s):" in out and "shape: ... and 88 more (--json lists all)" in out
    assert len(json.loads((tmp_path / "broken.json").read_text())["problems"]) == 96
