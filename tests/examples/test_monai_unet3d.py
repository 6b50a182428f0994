"""Smoke test of examples/monai_unet3d.py at a tiny size: it runs and reports well-formed numbers."""

import json
import math

from examples.monai_unet3d import main


def test_tiny_run_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    result = main(["--size", "16", "--train-volumes", "2", "--test-volumes", "1", "--epochs", "1",
                   "--batch-size", "1", "--threads", "1", "--out", str(out)])
    assert [r["norm"] for r in result["runs"]] == ["bn", "cbn", "gn", "in"]
    for r in result["runs"]:
        assert 0 <= r["test_dice"] <= 1 and 0 <= r["train_dice"] <= 1 and math.isfinite(r["step_ms"])
    assert result["runs"][1]["pairing"].startswith("6 of 6 CBN layers compensated")
    assert "SYNTHETIC" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["data"].startswith("synthetic")
    assert (out / "dice.png").stat().st_size > 1000
