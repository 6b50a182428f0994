"""The kernel-forms benchmark runs with well-formed figures for every operation and form."""

from benchmarks.kernel_forms import run


def test_kernel_forms_smoke(tmp_path):
    md = tmp_path / "perf.md"
    rows = run(["--batch-sizes", "1", "--rounds", "3", "--md", str(md)])
    assert [(r["what"].split(",")[0], r["shape"]) for r in rows] == [
        ("normalization", "1x16x28x28"), ("Taylor products", "16x144"), ("Taylor products", "64x576"),
        ("Taylor products", "512x4608"),
    ]
    assert all(r["kernels_us"] > 0 and r["python_us"] > 0 for r in rows)
    assert rows[0]["batchnorm_us"] > 0
    text = md.read_text()
    assert "<!-- kernel-forms:start -->" in text and "| Taylor products, window of 3 | 512x4608 |" in text
