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
    assert rows["cbn"]["flops_measured"] > rows["naive"]["flops_measured"] == rows["bn"]["flops_measured"]
    assert rows["authors"]["memory_measured_bytes"] > 2.5 * rows["cbn"]["memory_measured_bytes"] > 0
    text = md.read_text()
    assert text.startswith("# Performance\n\nhand-written text") and "<!-- cost-table:start -->" in text
    run(["--batch-sizes", "2", "--variants", "bn", "cbn", "--steps", "1", "--eval-steps", "1", "--md", str(md)])
    assert md.read_text().count("<!-- cost-table:start -->") == 1  # the section is replaced
