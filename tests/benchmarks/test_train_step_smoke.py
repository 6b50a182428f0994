"""The training-step benchmark runs end to end at tiny sizes and writes what it promises."""

import json

import torch
from torch import nn

from benchmarks.train_step import PYTHON_VARIANTS, VARIANTS, WeightGradFloor, run


def test_smoke_run_writes_json_and_markdown(tmp_path):
    json_path, md_path = tmp_path / "perf.json", tmp_path / "perf.md"
    result = run(["--smoke", "--quiet", "--json", str(json_path), "--md", str(md_path)])
    data = json.loads(json_path.read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("command", "machine", "args", "train", "memory", "eval", "ops", "wall_s"):
        assert key in data, key
    assert data["machine"]["threads"] == 1
    assert data["machine"]["cbn_kernels"] is True

    train = {(r["variant"], r["window"]): r for r in data["train"]}
    assert set(train) == {("bn", None), ("floor", None), ("cbn", 2), ("naive", 2), ("authors", 2)}
    for row in train.values():
        assert row["batch"] == 2 and row["n"] == 3
        assert 0 < row["min_ms"] <= row["median_ms"]
        assert row["ratio_to_bn"] > 0
    assert train[("bn", None)]["ratio_to_bn"] == 1.0

    memory = {r["variant"]: r for r in data["memory"]}
    assert set(memory) == {"cbn", "naive", "authors"}
    ref = data["paired_conv_weight_bytes"]
    assert memory["cbn"]["reference_bytes"] == ref > 0
    # The authors' port keeps three weight-sized tensors per past iteration (plus two vectors).
    assert memory["authors"]["bytes"] > 3 * ref
    assert 0 < memory["cbn"]["bytes"] < memory["authors"]["bytes"]

    evals = {r["variant"]: r for r in data["eval"]}
    for key in ("bn_folded", "cbn_folded", "cbn_unfolded"):
        assert evals[key]["median_ms"] > 0
    assert evals["cbn_folded_vs_cbn_eval_max_abs_diff"]["value"] < 1e-3

    ops = {r["variant"]: r for r in data["ops"]}
    assert set(ops) == set(VARIANTS) - set(PYTHON_VARIANTS)
    assert ops["bn"]["aten_ops"] > 0
    assert ops["authors"]["aten_ops"] > ops["bn"]["aten_ops"]

    text = md_path.read_text()
    for heading in ("Training step time", "Window-state memory", "Eval-mode forward time",
                    "Aten ops per training step"):
        assert heading in text
    assert "--smoke" in text


def test_python_variants_run_without_the_kernels(tmp_path):
    result = run(["--smoke", "--quiet", "--no-eval", "--variants", "bn", "cbn", "cbn-python",
                  "--json", str(tmp_path / "perf.json"), "--md", str(tmp_path / "perf.md")])
    assert {(r["variant"], r["window"]) for r in result["train"]} == {("bn", None), ("cbn", 2), ("cbn-python", 2)}
    ops = {r["variant"]: r for r in result["ops"]}
    # Every norm layer's normalization plus the two batched shift calls of the window step.
    assert ops["cbn"]["cbn_kernel_calls"] >= 21 + 2
    assert ops["cbn-python"]["cbn_kernel_calls"] == 0
    assert "CBN (Python)" in (tmp_path / "perf.md").read_text()


def test_floor_keeps_the_weight_gradient_of_its_output_eager_and_compiled():
    """The floor's extra convolution must run, and in a compiled graph too (where a result that
    nothing reads would be dropped): its buffer holds the weight gradient for ``dy = y``."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for compiled in (False, True):
        floor = WeightGradFloor(nn.Conv2d(3, 4, 3, padding=1).double()).train()
        run = torch.compile(floor, backend="aot_eager", fullgraph=True) if compiled else floor
        y = run(x)
        weight = floor.conv.weight.detach().requires_grad_()
        expected, = torch.autograd.grad(nn.functional.conv2d(x, weight, padding=1), weight, y.detach())
        torch.testing.assert_close(floor.weight_gradient, expected, rtol=1e-12, atol=1e-12)
