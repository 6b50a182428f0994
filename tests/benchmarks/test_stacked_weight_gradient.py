"""The stacked-weight-gradient benchmark runs with well-formed figures for every shape and form."""

import torch

from benchmarks.stacked_weight_gradient import run, weight_gradient


def test_stacked_rows_are_the_two_separate_gradients():
    # The measurement compares equal work: the stacked call's rows are the two separate gradients.
    gen = torch.Generator().manual_seed(0)
    x, g, y = (torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    stacked = weight_gradient(torch.cat((g, y), 1), x, [8, 4, 3, 3])
    torch.testing.assert_close(stacked[:4], weight_gradient(g, x, [4, 4, 3, 3]))
    torch.testing.assert_close(stacked[4:], weight_gradient(y, x, [4, 4, 3, 3]))


def test_stacked_weight_gradient_smoke(tmp_path):
    md = tmp_path / "perf.md"
    rows = run(["--batch-sizes", "2", "--rounds", "2", "--md", str(md)])
    assert [r["shape"] for r in rows] == ["2x16x28x28", "2x32x14x14", "2x64x7x7", "2x64x56x56"]
    assert all(r[f"{form}_us"] > 0 for r in rows for form in ("producer", "separate", "stacked"))
    text = md.read_text()
    assert "<!-- stacked-weight-gradient:start -->" in text and "| 2x64x56x56 |" in text
