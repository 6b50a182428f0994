"""The depthwise-kernel benchmark runs every EfficientNet-B0 shape, and both forms agree there."""

import json

from benchmarks.depthwise_kernel import SHAPES, main


def test_depthwise_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "depthwise.json"
    rows = main(["--rounds", "2", "--json", str(out)])
    assert [(r["channels"], r["size"], r["kernel"], r["stride"]) for r in rows] == list(SHAPES)
    assert all(r["kernel_us"] > 0 and r["aten_us"] > 0 for r in rows)
    # float32 sums of at most 2 x 80 x 80 terms each, in two orders
    assert all(r["max_abs_difference"] <= 1e-4 * r["max_abs_value"] for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
