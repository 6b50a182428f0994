"""The cost-table benchmark runs, its theory agrees with its measurements, and it writes its section."""

from benchmarks.cost_table import run


def test_cost_table_theory_matches_flop_counter_and_buffers(tmp_path):
    md = tmp_path / "performance.md"
    md.write_text("# Performance\n\nhand-written text\n")
    result = run(["--batch-sizes", "2", "--steps", "1", "--eval-steps", "1", "--warmup", "5", "--md", str(md)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"bn", "gn", "brn", "naive", "cbn", "authors"}
    for variant, row in rows.items():
        # Two independent counts: the shapes' formulas against the dispatched operators, and
        # the formulas of each method's state against the model's buffers and lists.
        assert row["flops_theory_counted"] == row["flops_measured"], variant
        assert abs(row["memory_theory_bytes"] - row["memory_measured_bytes"]) <= 256, variant
        assert row["step_ms"] > 0 and row["eval_ms"] > 0
    assert rows["naive"]["flops_measured"] == rows["bn"]["flops_measured"]
    # CBN's statistic-gradient convolutions (one weight gradient per paired convolution: about a
    # third of BatchNorm's three convolutions): the counter sees those ATen computes (every layer's
    # without the C++ kernels, the 1x1 shortcuts' variance rows with them); the theory's bracket
    # holds the kernels' own loops (the 3x3 layers, the shortcuts' mean patches) and the Taylor
    # products.
    from cbn import kernels

    extra_seen = rows["cbn"]["flops_measured"] - rows["bn"]["flops_measured"]
    bracket = rows["cbn"]["flops_theory_elementwise"]
    if kernels.active():
        assert 0 < extra_seen < bracket and bracket > rows["bn"]["flops_measured"] // 4
    else:
        assert extra_seen > rows["bn"]["flops_measured"] // 4 > bracket
    text = md.read_text()
    assert text.startswith("# Performance\n\nhand-written text") and "<!-- cost-table:start -->" in text
    run(["--batch-sizes", "2", "--variants", "bn", "cbn", "--steps", "1", "--eval-steps", "1", "--md", str(md)])
    assert md.read_text().count("<!-- cost-table:start -->") == 1  # the section is replaced


def test_peak_bytes_follows_allocations_and_frees():
    import torch

    from benchmarks.cost_table import peak_bytes

    def step():
        a = torch.ones(1000, 1000)  # 4 MB
        b = torch.exp(a)  # 8 MB held
        del a  # 4 MB
        c = torch.ones(250, 1000)  # 5 MB: below the earlier peak
        return b, c

    assert peak_bytes(step) == 8_000_000


def test_detector_cost_table_measures_bn_gn_cbn(tmp_path):
    from torch import nn

    from benchmarks.cost_table import build_detector_variant

    md = tmp_path / "performance.md"
    md.write_text("# Performance\n\n<!-- cost-table:start -->\nresnet table\n<!-- cost-table:end -->\n")
    result = run(["--model", "detector", "--window", "2", "--steps", "1", "--eval-steps", "1", "--warmup", "1",
                  "--md", str(md)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["bn", "gn", "cbn"] and all(r["batch"] == 2 for r in rows.values())
    # GroupNorm keeps no running statistics: exactly BatchNorm's 2 C floats and one int64 counter less.
    bn_model = build_detector_variant("bn", 2, 0)
    norms = [m for m in bn_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert rows["gn"]["memory_measured_bytes"] == -sum(2 * 4 * m.num_features + 8 for m in norms)
    # CBN's window holds, per paired conv, at least one weight-sized entry per past iteration.
    conv_bytes = sum(4 * m.weight.numel() for m in bn_model.modules() if isinstance(m, nn.Conv2d))
    assert rows["cbn"]["memory_measured_bytes"] >= 1 * conv_bytes * 0.9
    # The norms themselves are not counted as FLOPs: BN and GN run the same convolutions and matrix
    # products; CBN adds its statistic-gradient convolutions in training, none once reverted.
    assert rows["gn"]["flops_train"] == rows["bn"]["flops_train"] < rows["cbn"]["flops_train"]
    assert rows["bn"]["flops_eval"] == rows["cbn"]["flops_eval"] == rows["gn"]["flops_eval"] > 0
    for r in rows.values():
        assert r["peak_train_bytes"] > r["resident_bytes"] > 0 and r["peak_above_start_bytes"] > 0
        assert r["step_ms"] > 0 and r["eval_ms"] > 0
    assert rows["cbn"]["pairing"].startswith("20 of 20")
    text = md.read_text()
    assert "resnet table" in text and text.count("<!-- cost-table-detector:start -->") == 1
    assert "Faster R-CNN" in text and "GroupNorm | 2 |" in text
