"""Grid sweeps (norms x batch sizes x seeds) in parallel single-thread worker processes.

Each run is a subprocess ``python -m cbn.experiments.train CONFIG.json`` with
``OMP_NUM_THREADS=1``; a run is finished when its JSON record exists (written atomically), so
an interrupted sweep resumes where it stopped. Afterwards the sweep writes ``results.json``,
``results.md`` (mean +- std of the test accuracy) and ``accuracy_vs_batch.png``.

Scheduling: ``workers`` slots; a syncbn run with ``nproc`` processes takes ``nproc`` slots, so
the machine never runs more than ``workers`` training processes at once. Writing a number to
``<out>/WORKERS`` changes the limit of a running sweep (it applies to runs not yet started).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cbn.experiments.train import TrainConfig

NORM_LABELS = {
    "bn": "BN",
    "brn": "BRN",
    "gn": "GN",
    "naive": "naive CBN",
    "cbn": "CBN",
    "syncbn": "SyncBN",
}


@dataclass(frozen=True)
class SweepSpec:
    norms: tuple = ("bn", "brn", "gn", "naive", "cbn", "syncbn")
    batch_sizes: tuple = (32, 16, 8, 4, 2, 1)
    seeds: tuple = (0, 1)
    workers: int = 2
    out: str = "runs/sweep"
    train: TrainConfig = field(default_factory=TrainConfig)
    data_dir: str | None = None

    def with_(self, **changes) -> "SweepSpec":
        changes = {k: v for k, v in changes.items() if v is not None or k == "data_dir"}
        return replace(self, **changes)

    @property
    def train_overrides(self) -> dict:
        """Values of the train template that differ from TrainConfig's defaults (CLI defaults)."""
        base = asdict(TrainConfig())
        return {k: v for k, v in asdict(self.train).items() if base[k] != v}

    def configs(self) -> list[TrainConfig]:
        out = []
        for norm in self.norms:
            for bs in self.batch_sizes:
                for seed in self.seeds:
                    out.append(
                        replace(
                            self.train, norm=norm, batch_size=bs, seed=seed, progress=False,
                            data_dir=self.data_dir or self.train.data_dir,
                            out=str(Path(self.out) / "runs"),
                        )
                    )
        return out


# The full ResNet-20 sweep of docs/results.md (sized from measured step times to ~50 min on
# 2 single-thread workers) and the ~10 minute demo.
FULL = SweepSpec(
    out="runs/full",
    train=TrainConfig(model="resnet20", epochs=1, train_subset=2400, test_subset=2000, eval_every=0, nproc=2,
                      window_cap=8),
)
DEMO = SweepSpec(
    norms=("bn", "gn", "brn", "naive", "cbn", "syncbn"),
    batch_sizes=(32, 8, 2, 1),
    seeds=(0,),
    out="runs/demo",
    train=TrainConfig(model="resnet8", epochs=2, train_subset=1500, test_subset=2000, eval_every=0, nproc=2,
                      window_cap=8),
)


def _slots(cfg: TrainConfig) -> int:
    return cfg.nproc if cfg.norm == "syncbn" else 1


def _result_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / f"{cfg.run_name()}.json"


def _launch(cfg: TrainConfig, sweep_dir: Path) -> subprocess.Popen:
    config_dir = sweep_dir / "configs"
    log_dir = sweep_dir / "logs"
    config_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = config_dir / f"{cfg.run_name()}.json"
    config_path.write_text(json.dumps(asdict(cfg), indent=2))
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(log_dir / f"{cfg.run_name()}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "cbn.experiments.train", str(config_path)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )


def _current_workers(sweep_dir: Path, default: int) -> int:
    """The slot limit: ``default``, or the integer in ``<sweep>/WORKERS`` (editable while running)."""
    try:
        return max(1, int((sweep_dir / "WORKERS").read_text().strip()))
    except (OSError, ValueError):
        return default


def run_sweep(spec: SweepSpec, progress: bool = True) -> dict:
    """Run every missing run of the grid, then :func:`report`. Returns report's summary."""
    sweep_dir = Path(spec.out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "spec.json").write_text(json.dumps(asdict(spec), indent=2, default=list))
    configs = spec.configs()
    pending = [c for c in configs if not _result_path(c).exists()]
    # Multi-slot runs first (they need the whole machine), then the slowest (smallest batch).
    pending.sort(key=lambda c: (-_slots(c), c.batch_size, c.norm, c.seed))
    for c in pending:
        if _slots(c) > spec.workers:
            raise ValueError(f"{c.run_name()} needs {_slots(c)} slots but the sweep has {spec.workers} workers")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs), initial=len(configs) - len(pending), desc="sweep", unit="run", file=sys.stderr)
    running: list[tuple[subprocess.Popen, TrainConfig]] = []
    failures = []
    try:
        while pending or running:
            workers = _current_workers(sweep_dir, spec.workers)
            free = workers - sum(_slots(c) for _, c in running)
            while pending:
                # First pending run that fits; a multi-slot run waits while the limit is lowered.
                fits = [i for i, c in enumerate(pending) if _slots(c) <= free]
                if not fits or (fits[0] != 0 and _slots(pending[0]) <= workers):
                    break
                cfg = pending.pop(fits[0])
                running.append((_launch(cfg, sweep_dir), cfg))
                free -= _slots(cfg)
            time.sleep(0.5)
            still = []
            for proc, cfg in running:
                if proc.poll() is None:
                    still.append((proc, cfg))
                    continue
                if proc.returncode != 0 or not _result_path(cfg).exists():
                    failures.append(cfg.run_name())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(cfg.run_name())
            running = still
    finally:
        for proc, _ in running:
            proc.terminate()
        if bar is not None:
            bar.close()
    if failures:
        print(f"failed runs (see {sweep_dir / 'logs'}): {', '.join(failures)}", file=sys.stderr)
    return report(sweep_dir)


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def report(sweep_dir: str | os.PathLike) -> dict:
    """Aggregate the JSON records under ``sweep_dir/runs``: results.json, results.md, plot."""
    sweep_dir = Path(sweep_dir)
    records = [json.loads(p.read_text()) for p in sorted((sweep_dir / "runs").glob("*.json"))]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        key = (r["config"]["norm"], r["config"]["batch_size"])
        groups.setdefault(key, []).append(r)
    norms = [n for n in NORM_LABELS if any(k[0] == n for k in groups)]
    batch_sizes = sorted({k[1] for k in groups}, reverse=True)
    cells = []
    for (norm, bs), rs in sorted(groups.items()):
        mean, std = _mean_std([r["test_acc"] for r in rs])
        cells.append({
            "norm": norm, "batch_size": bs, "mean": mean, "std": std, "n": len(rs),
            "seeds": sorted(r["config"]["seed"] for r in rs),
            "test_acc": [r["test_acc"] for r in rs],
            "diverged": sum(bool(r["diverged"]) for r in rs),
            "step_ms": statistics.fmean(statistics.fmean(e["step_ms"] for e in r["epochs"]) for r in rs),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
            "window": rs[0]["protocol"]["window"], "burnin": rs[0]["protocol"]["burnin"],
            "lr": rs[0]["protocol"]["lr"], "global_batch": rs[0]["protocol"]["global_batch"],
        })
    lookup = {(c["norm"], c["batch_size"]): c for c in cells}
    header = "| norm | " + " | ".join(f"bs {b}" for b in batch_sizes) + " |"
    lines = [header, "|" + "---|" * (len(batch_sizes) + 1)]
    for norm in norms:
        row = []
        for b in batch_sizes:
            c = lookup.get((norm, b))
            if c is None:
                row.append("-")
            else:
                row.append(f"{c['mean']:.2f} ± {c['std']:.2f}" + (f" (n={c['n']})" if c["n"] != 2 else ""))
        lines.append(f"| {NORM_LABELS[norm]} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    results_path = sweep_dir / "results.json"
    results_path.write_text(json.dumps({"cells": cells, "runs": records}, indent=2, default=float))
    (sweep_dir / "results.md").write_text(
        "Test accuracy (%), mean ± std over seeds (n=2 unless noted), eval mode.\n\n" + table + "\n"
    )
    plot_path = sweep_dir / "accuracy_vs_batch.png"
    if cells:
        plot(cells, norms, plot_path)
    return {"table": table, "plot": str(plot_path), "results": str(results_path), "cells": cells}


def plot(cells: list[dict], norms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(bn="o", brn="s", gn="^", naive="v", cbn="D", syncbn="x")
    for norm in norms:
        cs = sorted((c for c in cells if c["norm"] == norm), key=lambda c: c["batch_size"])
        xs = [c["batch_size"] for c in cs]
        ax.errorbar(xs, [c["mean"] for c in cs], yerr=[c["std"] for c in cs], marker=markers.get(norm, "o"),
                    capsize=3, label=NORM_LABELS[norm], linewidth=2 if norm == "cbn" else 1.2)
    ax.set_xscale("log", base=2)
    all_bs = sorted({c["batch_size"] for c in cells})
    ax.set_xticks(all_bs)
    ax.set_xticklabels([str(b) for b in all_bs])
    ax.invert_xaxis()
    ax.set_xlabel("batch size per iteration (per process for SyncBN)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: accuracy vs batch size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
