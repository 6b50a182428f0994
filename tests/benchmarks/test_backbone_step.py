"""The backbone benchmark runs, names its floor and variants, and its --cells selection parses."""

import pytest

from benchmarks.backbone_step import MODELS, markdown, parse_args, run


def test_smoke_run_measures_every_variant_with_op_counts(tmp_path):
    md = tmp_path / "section.md"
    rows = run(["--smoke", "--md", str(md)])
    assert {r["variant"] for r in rows} == {"bn", "floor", "naive", "cbn", "cbn-diff"}
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["bn"]["ratio"] == 1.0
    # Every CBN variant does strictly more operations than BatchNorm; the windows hold bytes.
    for variant in ("naive", "cbn", "cbn-diff"):
        assert by_variant[variant]["aten_ops"] > by_variant["bn"]["aten_ops"]
    assert by_variant["cbn-diff"]["window_bytes"] > by_variant["naive"]["window_bytes"] > 0
    text = md.read_text()
    assert "Real backbones" in text and "default (differentiable)" in text


def test_cells_select_model_and_size_pairs():
    args = parse_args(["--cells", "resnet50:128", "detector:192", "resnet50:96"])
    assert args.models == ["resnet50", "detector"]
    assert args.sizes_of("resnet50") == [128, 96] and args.sizes_of("detector") == [192]
    assert tuple(parse_args([]).sizes_of("efficientnet_b0")) == MODELS["efficientnet_b0"]
    with pytest.raises(SystemExit):
        parse_args(["--cells", "vgg:64"])


def test_markdown_reports_the_default_against_the_paper_rule():
    row = dict(model="resnet18", size=64, batch=2, window=4, q1_ms=1.0, q3_ms=2.0)
    rows = [dict(row, variant="bn", step_ms=10.0, ratio=1.0), dict(row, variant="cbn", step_ms=15.0, ratio=1.5),
            dict(row, variant="cbn-diff", step_ms=18.0, ratio=1.8)]
    text = markdown(rows, "cmd", {"git_commit": "abc", "device": "cpu", "threads": 1, "load_average_start": (0, 0, 0)})
    assert "| resnet18 | 64 | 2 | 10 ms (1-2) | 1.50x (1-2 ms) | 1.80x (1-2 ms) | 1.20x |" in text
