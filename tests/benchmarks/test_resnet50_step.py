"""The ResNet-50 benchmark runs (at a tiny image size) and reports well-formed ratios."""

from benchmarks.resnet50_step import ResNet50, run


def test_resnet50_layout_and_smoke_run(tmp_path):
    model = ResNet50()
    norms = [m for m in model.modules() if type(m).__name__ == "BatchNorm2d"]
    assert len(norms) == 53
    md = tmp_path / "perf.md"
    rows = run(["--batch-sizes", "2", "--steps", "1", "--image-size", "32", "--md", str(md)])
    assert {r["variant"] for r in rows} == {"bn", "floor", "naive", "cbn"}
    assert all(r["step_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "bn")["ratio"] == 1.0
    assert "<!-- resnet50:start -->" in md.read_text()
