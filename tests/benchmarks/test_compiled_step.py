"""The compiled-step benchmark runs (aot_eager backend: no C++ build) with well-formed figures."""

from benchmarks.compiled_step import run


def test_compiled_step_smoke(tmp_path):
    md = tmp_path / "perf.md"
    rows = run(["--batch-sizes", "2", "--variants", "floor", "cbn", "--steps", "1",
                "--backend", "aot_eager", "--md", str(md)])
    assert {(r["mode"], r["variant"]) for r in rows} == {
        (m, v) for m in ("compiled", "eager") for v in ("bn", "floor", "cbn")}
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert all((r["compile_s"] is not None) == (r["mode"] == "compiled") for r in rows)
    assert "<!-- compiled:start -->" in md.read_text()
