import json
from pathlib import Path

from moeq.cli import main

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo-mixtral"


def test_plan_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(DEMO), "--recipe", "mixtral", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int4 g128 sym gptq+act" in text and "average bits/weight: 7.15" in text
    plan = json.loads(out.read_text())
    assert len(plan["tensors"]) == 126 and plan["totals"]["params"] == 4_396_160


def test_config_only_plan(tmp_path, capsys):
    assert main(["plan", str(DEMO / "config.json"), "--config-only"]) == 0
    assert "config only (mixtral, 4 layers, 8 experts top-2)" in capsys.readouterr().out


def test_errors_are_one_line_with_status_2(capsys):
    assert main(["plan", str(DEMO), "--set", "defaults.bitz=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeq: error: mixtral.yaml defaults: unknown scheme key 'bitz'")
    assert "Traceback" not in err
