"""The compiled-kernel benchmark runs (aot_eager backend: no C++ build) with well-formed figures."""

from benchmarks.compiled_kernels import run


def test_compiled_kernels_smoke(tmp_path):
    md = tmp_path / "perf.md"
    rows = run(["--variants", "cbn", "--blocks", "2", "--batch-sizes", "2", "4", "--steps", "1", "--profile-steps", "1",
                "--backend", "aot_eager", "--md", str(md)])
    assert [(r["batch"], r["variant"]) for r in rows] == [(2, "bn"), (2, "cbn"), (4, "bn"), (4, "cbn")]
    assert all(r["ms"] > 0 and r["eager_ms"] > 0 and r["convolution_backward_us"] > 0 and r["kernels_us"] >= 0
               for r in rows)
    text = md.read_text()
    assert "<!-- compiled-kernels:start -->" in text and "| 4 | CBN |" in text and "| 2 | floor" in text


def test_traced_layout_is_restored_after_the_run(tmp_path):
    from cbn.functional import statistic_gradients

    decision = statistic_gradients._inductor_keeps_convolutions_channels_last
    run(["--variants", "cbn", "--blocks", "1", "--batch-sizes", "2", "--steps", "1", "--profile-steps", "1",
         "--backend", "aot_eager", "--traced-layout"])
    assert statistic_gradients._inductor_keeps_convolutions_channels_last is decision
