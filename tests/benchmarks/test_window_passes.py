"""The window-pass benchmark times its passes over real layer shapes and counts their bytes."""

import json

import timm

from benchmarks.window_passes import main, window_shapes


def test_window_shapes_are_the_convolutions_slots():
    shapes = window_shapes(timm.create_model("efficientnet_b0"))
    assert shapes[0] == (1, 32, 27)  # the stem: 3 x 3 x 3 weights per channel
    assert (32, 32, 9) in shapes  # the first depthwise convolution: one group per channel


def test_window_passes_smoke(tmp_path):
    out = tmp_path / "passes.json"
    rows = main(["--models", "resnet18", "--smoke", "--json", str(out)])
    assert [row["pass_"] for row in rows] == ["shifts", "backward", "fingerprint"]
    # resnet18's first three convolutions: 64 x 147, 64 x 576, 64 x 576 weights, three slots each.
    weights = 64 * 147 + 2 * 64 * 576
    window_bytes = 4 * (4 * weights + 3 * (147 + 2 * 576))  # the slots and the weights
    assert all(row["layers"] == 3 and row["bytes"] == window_bytes for row in rows[:2])
    assert rows[2]["layers"] == 3 and rows[2]["bytes"] == 4 * (weights + 3 * 64)  # the weights and biases
    assert all(row["ms"] > 0 for row in rows)
    assert json.loads(out.read_text())["rows"] == rows
