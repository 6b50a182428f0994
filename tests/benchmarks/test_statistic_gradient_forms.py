"""The statistic-gradient forms benchmark times both forms of a shape, alternated, and writes them."""

import json

from benchmarks.statistic_gradient_forms import main


def test_statistic_gradient_forms_smoke(tmp_path):
    out = tmp_path / "forms.json"
    rows = main(["--shapes", "1:8:8:6:3:1", "1:8:8:6:1:1", "--rounds", "1", "--json", str(out)])
    assert [row["shape"] for row in rows] == ["1:8:8:6:3:1", "1:8:8:6:1:1"]
    assert all(row["kernels_us"] > 0 and row["aten_us"] > 0 and row["floor_us"] > 0 and row["rounds"] == 1
               for row in rows)
    assert json.loads(out.read_text())["rows"] == rows


def test_statistic_gradient_forms_times_resnet20_in_one_call():
    (row,) = main(["--resnet20", "1", "--rounds", "2"])
    assert row["shape"] == "resnet20 batch 1 (21 convolutions)" and row["kernels_us"] > 0


def test_statistic_gradient_forms_times_a_backbone_against_the_floor():
    (row,) = main(["--backbone", "resnet18:32:1", "--rounds", "1"])
    assert row["shape"] == "resnet18:32:1 (20 convolutions)"
    assert row["kernels_us"] > 0 and row["floor_us"] > 0 and row["floor_ratio"] > 0
