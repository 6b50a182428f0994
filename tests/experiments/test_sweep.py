"""Sweep bookkeeping: resumability (finished runs skipped) and the aggregated table."""

import json
import math
import statistics
from dataclasses import asdict

from cbn.experiments import sweep
from cbn.experiments.train import TrainConfig


def _fake_record(cfg, acc, **extra):
    return {"name": cfg.run_name(), "config": asdict(cfg),
            "protocol": {"window": cfg.window or 1, "burnin": 5, "lr": 0.1, "global_batch": cfg.batch_size,
                         "steps_per_epoch": 10, "total_steps": 20},
            "epochs": [{"epoch": 1, "step_ms": 1.0, "test_acc": acc - 1}, {"epoch": 2, "step_ms": 1.0, "test_acc": acc}],
            "train_seconds": 1.0, "test_acc": acc, "train_eval_acc": acc + 5, "diverged": False, **extra}


def _write(tmp_path, record):
    path = tmp_path / "runs" / f"{record['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_finished_runs_are_skipped_and_reported(tmp_path, monkeypatch):
    spec = sweep.SweepSpec(norms=("bn", "gn"), batch_sizes=(4, 2), seeds=(0, 1), out=str(tmp_path),
                           train=TrainConfig(model="resnet8"))
    accs = {}
    for i, cfg in enumerate(spec.configs()):
        accs[cfg.run_name()] = 50.0 + 3.7 * i
        _write(tmp_path, _fake_record(cfg, accs[cfg.run_name()]))

    def no_launch(*a, **k):
        raise AssertionError("a finished run was launched again")

    monkeypatch.setattr(sweep, "_launch", no_launch)
    summary = sweep.run_sweep(spec, progress=False)
    cell = next(c for c in summary["cells"] if c["norm"] == "gn" and c["batch_size"] == 2)
    values = [accs["gn_bs2_seed0"], accs["gn_bs2_seed1"]]
    assert abs(cell["mean"] - statistics.fmean(values)) < 1e-9
    assert abs(cell["std"] - statistics.stdev(values)) < 1e-9
    assert f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" in summary["table"]
    assert (tmp_path / "accuracy_vs_batch.png").stat().st_size > 1000
    assert (tmp_path / "results.md").exists() and json.loads((tmp_path / "results.json").read_text())["cells"]


def test_syncbn_takes_nproc_slots():
    cfg = TrainConfig(norm="syncbn", nproc=2)
    assert sweep._slots(cfg) == 2 and sweep._slots(TrainConfig(norm="cbn", nproc=2)) == 1


def test_small_batch_seeds_ablations_and_headline_runs_first():
    spec = sweep.SweepSpec(norms=("bn", "gn", "cbn", "naive"), batch_sizes=(32, 4, 1), seeds=(0, 1),
                           small_batch_seeds=(0, 1, 2), extra_runs=({"tag": "k2", "norm": "cbn", "batch_size": 1,
                                                                    "window": 2},
                                                                   {"tag": "k4", "norm": "cbn", "batch_size": 1,
                                                                    "window": 4, "seeds": (0, 1)}))
    configs = spec.configs()
    names = {c.run_name() for c in configs}
    assert "gn_bs32_seed1" in names and "gn_bs32_seed2" not in names and "gn_bs4_seed2" in names
    assert {"cbn_k2_bs1_seed0", "cbn_k2_bs1_seed2", "cbn_k4_bs1_seed1"} <= names
    assert "cbn_k4_bs1_seed2" not in names  # its own seeds
    assert next(c for c in configs if c.tag == "k2").window == 2
    ordered = [c.run_name() for c in sorted(configs, key=sweep.run_priority)]
    headline = {f"{n}_bs{b}_seed{s}" for n in ("bn", "naive", "cbn") for b in (1,) for s in (0, 1, 2)}
    headline |= {"bn_bs32_seed0", "bn_bs32_seed1"}
    assert set(ordered[: len(headline)]) == headline
    # The rest of the grid, every seed, goes before the variants' repeats.
    assert ordered.index("gn_bs4_seed2") < ordered.index("cbn_k2_bs1_seed1") < ordered.index("cbn_k2_bs1_seed2")
    assert ordered.index("cbn_k2_bs1_seed0") < ordered.index("gn_bs4_seed2")


def test_report_intervals_comparisons_precise_control_and_ablations(tmp_path):
    cbn_acc, bn_acc = [80.0, 82.0, 81.0], [40.0, 45.0, 38.0]
    for seed in range(3):
        _write(tmp_path, _fake_record(TrainConfig(norm="cbn", batch_size=1, seed=seed), cbn_acc[seed]))
        _write(tmp_path, _fake_record(TrainConfig(norm="bn", batch_size=1, seed=seed), bn_acc[seed],
                                      precise_bn={"test_acc": bn_acc[seed] + 10, "train_eval_acc": 60.0}))
        _write(tmp_path, _fake_record(TrainConfig(norm="cbn", batch_size=1, seed=seed, tag="k2", window=2), 70.0 + seed))
    summary = sweep.report(tmp_path)
    cell = next(c for c in summary["cells"] if c["method"] == "cbn" and c["batch_size"] == 1)
    # t_{0.975, 2} = 4.302653 (tables); std of (80, 82, 81) is 1
    assert math.isclose(cell["ci95"], 4.302653 / math.sqrt(3), rel_tol=1e-5)
    assert math.isclose(cell["train_eval_mean"], 86.0)
    precise = next(c for c in summary["cells"] if c["method"] == sweep.PRECISE)
    assert math.isclose(precise["mean"], statistics.fmean(bn_acc) + 10)
    comparison = next(c for c in json.loads((tmp_path / "results.json").read_text())["comparisons"] if c["b"] == "bn")
    diffs = [c - b for c, b in zip(cbn_acc, bn_acc)]
    # paired t-test by hand: t = mean(d) / (sd(d) / sqrt(n)), two-sided, df = 2
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    from scipy import stats

    assert math.isclose(comparison["paired_p"], 2 * stats.t.sf(abs(t), 2), rel_tol=1e-9)
    assert math.isclose(comparison["diff"], statistics.fmean(diffs))
    assert "CBN (paper rule) [k2]" in summary["ablations"] and "BN + precise stats" in summary["table"]
    assert (tmp_path / "test_accuracy_vs_epoch.png").exists() is False  # no naive runs: no curves
    assert (tmp_path / "ablations.png").stat().st_size > 1000


def test_demo_preset_is_the_headline_cell():
    names = {c.run_name() for c in sweep.DEMO.configs()}
    # Three seeds of every form at the failing batch, so the ordering the demo prints is tested.
    assert names == {f"{norm}_bs1_seed{seed}" for norm in ("bn", "naive", "cbn", "cbn-diff") for seed in (0, 1, 2)} \
        | {"bn_bs32_seed0"}
    assert all(c.precise_bn_images and c.train_eval_subset for c in sweep.DEMO.configs())


def test_reading_names_the_failure_and_each_method(tmp_path):
    for norm, bs, acc in (("bn", 32, 85.0), ("bn", 1, 40.0), ("cbn", 1, 80.0), ("naive", 1, 75.0)):
        extra = {"precise_bn": {"test_acc": 45.0, "train_eval_acc": 46.0}} if norm == "bn" else {}
        _write(tmp_path, _fake_record(TrainConfig(norm=norm, batch_size=bs), acc, **extra))
    text = sweep.report(tmp_path)["reading"]
    assert text.startswith("Reading: at batch 1 BN reaches 40.0 % test accuracy against 85.0 % at batch 32")
    assert "eval-mode train accuracy 45.0 %" in text
    assert "CBN (paper rule) 80.0 %, naive CBN 75.0 %, BN with precise statistics 45.0 %" in text
    assert (tmp_path / "test_accuracy_vs_epoch.png").stat().st_size > 1000  # BN, naive, CBN at batch 1


def test_differentiable_cbn_is_compared_with_another_sweeps_cells_by_seed():
    lookup = {("cbn-diff", 1): {"test_acc": {0: 82.0, 1: 83.0, 2: 81.0}}}
    summary = {"cells": [
        {"method": "gn", "batch_size": 1, "tag": "", "test_acc": {"0": 80.0, "1": 82.0, "2": 81.5}},
        {"method": "bn", "batch_size": 32, "tag": "", "test_acc": {"0": 84.0, "1": 85.0}},
    ]}
    rows = sweep._grid_comparisons(lookup, [1], summary)
    assert rows[0].startswith("| 1 | CBN (differentiable) - GN (grid) | +0.83 |") and rows[0].endswith("(3) |")
    assert rows[1].startswith("| 1 | CBN (differentiable) - BN at batch 32 (grid) | -2.50 |")
    assert rows[1].endswith("(2) |")
