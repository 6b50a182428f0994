"""Sweep bookkeeping: resumability (finished runs skipped) and the aggregated table."""

import json
import statistics

from cbn.experiments import sweep
from cbn.experiments.train import TrainConfig


def _fake_record(cfg, acc):
    return {"name": cfg.run_name(), "config": {"norm": cfg.norm, "batch_size": cfg.batch_size, "seed": cfg.seed},
            "protocol": {"window": 1, "burnin": 0, "lr": 0.1, "global_batch": cfg.batch_size},
            "epochs": [{"step_ms": 1.0}], "train_seconds": 1.0, "test_acc": acc, "diverged": False}


def test_finished_runs_are_skipped_and_reported(tmp_path, monkeypatch):
    spec = sweep.SweepSpec(norms=("bn", "gn"), batch_sizes=(4, 2), seeds=(0, 1), out=str(tmp_path),
                           train=TrainConfig(model="resnet8"))
    accs = {}
    for i, cfg in enumerate(spec.configs()):
        accs[cfg.run_name()] = 50.0 + 3.7 * i
        path = tmp_path / "runs" / f"{cfg.run_name()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_fake_record(cfg, accs[cfg.run_name()])))

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
