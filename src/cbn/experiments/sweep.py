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

from cbn.experiments.significance import compare, summarize
from cbn.experiments.train import TrainConfig

NORM_LABELS = {
    "bn": "BN",
    "brn": "BRN",
    "gn": "GN",
    "naive": "naive CBN",
    "cbn": "CBN (paper rule)",
    "cbn-diff": "CBN (differentiable)",
    "syncbn": "SyncBN",
}


@dataclass(frozen=True)
class SweepSpec:
    """A grid of norms x batch sizes x seeds, plus extra runs (ablation variants, single cells).

    ``small_batch_seeds`` (when set) replaces ``seeds`` at batch sizes ``<= small_batch``, where
    the spread between seeds is largest. Each extra run is a dict of TrainConfig overrides with at
    least ``norm`` and ``batch_size``; it runs for the seeds of its batch size, or for its own
    ``seeds`` when given. One with a ``tag``
    is a variant of the protocol (e.g. ``window``, ``burnin_fraction``), reported in the ablation
    table; one without is a cell of the main table outside the grid.
    """

    norms: tuple = ("bn", "brn", "gn", "naive", "cbn", "syncbn")
    batch_sizes: tuple = (32, 16, 8, 4, 2, 1)
    seeds: tuple = (0, 1)
    small_batch_seeds: tuple = ()
    small_batch: int = 4
    extra_runs: tuple = ()
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

    def seeds_for(self, batch_size: int) -> tuple:
        return self.small_batch_seeds if self.small_batch_seeds and batch_size <= self.small_batch else self.seeds

    def _config(self, **values) -> TrainConfig:
        return replace(self.train, progress=False, data_dir=self.data_dir or self.train.data_dir,
                       out=str(Path(self.out) / "runs"), **values)

    def configs(self) -> list[TrainConfig]:
        out = [
            self._config(norm=norm, batch_size=bs, seed=seed)
            for norm in self.norms for bs in self.batch_sizes for seed in self.seeds_for(bs)
        ]
        for extra in self.extra_runs:
            overrides = {k: v for k, v in extra.items() if k != "seeds"}
            for seed in extra.get("seeds", self.seeds_for(extra["batch_size"])):
                out.append(self._config(**overrides, seed=seed))
        return out


# The evidence sweep of docs/results.md: ResNet-8 on a fixed 2,000-image Fashion-MNIST subset,
# 12 epochs without augmentation (the fastest-converging protocol probed at batch 32), where BN at
# batch 1 fails by its train/test gap. Ablations at batch 1, seeds 0 and 1 (the sweep's budget of
# about 2.5 hours holds the grid's 3 seeds, not 3 for each variant): window k and burn-in fraction
# (compensation on/off is CBN vs naive CBN of the main grid, same window and burn-in); "e24"
# doubles the epochs of BN at batch 32, the plateau check.
EVIDENCE = SweepSpec(
    seeds=(0, 1),
    small_batch_seeds=(0, 1, 2),
    extra_runs=(
        *({"tag": f"k{k}", "norm": "cbn", "batch_size": 1, "window": k, "seeds": (0, 1)} for k in (1, 2, 4, 8)),
        *({"tag": f"burnin{int(f * 100)}", "norm": "cbn", "batch_size": 1, "burnin_fraction": f, "seeds": (0, 1)}
          for f in (0.0, 0.1, 0.5, 0.75)),
        {"tag": "e24", "norm": "bn", "batch_size": 32, "epochs": 24},
    ),
    out="runs/evidence",
    train=TrainConfig(model="resnet8", epochs=12, train_subset=2000, test_subset=2000, eval_every=1, nproc=2,
                      augment=False),
)
# Issue 21: differentiable compensation against the paper's rule and naive averaging on the
# evidence protocol (same training template, window and burn-in rules), 5 seeds at batch 1 and 2
# so that every comparison is paired by seed; differentiable CBN at batch 4 (5 seeds) beside the
# grid's batch-4 cells; its window and burn-in ablations at batch 1 (seeds 0 and 1).
DIFFERENTIABLE = replace(
    EVIDENCE, norms=("naive", "cbn", "cbn-diff"), batch_sizes=(1, 2), seeds=(0, 1, 2, 3, 4),
    small_batch_seeds=(0, 1, 2, 3, 4),
    extra_runs=(
        {"norm": "cbn-diff", "batch_size": 4},
        *({"tag": f"k{k}", "norm": "cbn-diff", "batch_size": 1, "window": k, "seeds": (0, 1)} for k in (4, 8)),
        *({"tag": f"burnin{int(f * 100)}", "norm": "cbn-diff", "batch_size": 1, "burnin_fraction": f,
           "seeds": (0, 1)} for f in (0.1, 0.5)),
    ),
    out="runs/differentiable",
)
# The one-epoch ResNet-20 sweep of the first results page (retired; kept reproducible).
FULL = SweepSpec(
    out="runs/full",
    train=TrainConfig(model="resnet20", epochs=1, train_subset=2400, test_subset=2000, eval_every=0, nproc=2,
                      window_cap=8, train_eval_subset=0, precise_bn_images=0),
)
# The headline in a few minutes (`make demo`): the failing cell of the evidence sweep at a smaller
# size. BN, naive CBN, CBN (paper) and CBN with differentiable compensation (the default) at batch 1,
# 3 seeds each so that the ordering it prints is tested (and the precise-BN control from the BN
# runs), BN at 32; about 2.5 minutes on 2 cores (docs/results.md, "Demo").
DEMO = SweepSpec(
    norms=("bn", "naive", "cbn", "cbn-diff"),
    batch_sizes=(1,),
    seeds=(0, 1, 2),
    extra_runs=({"norm": "bn", "batch_size": 32, "seeds": (0,)},),
    out="runs/demo",
    train=TrainConfig(model="resnet8", epochs=8, train_subset=300, test_subset=1000, eval_every=0, nproc=2,
                      augment=False, train_eval_subset=300, precise_bn_images=300),
)
# Runs whose comparison is the headline (BN, naive CBN and CBN at batch 1 and 2, and the BN
# reference at batch 32) go first with all their seeds, so a cut sweep still tests it; then the
# rest of the grid and each variant's first seed, then the variants' repeats.
_KEY_NORMS, _KEY_BATCHES, _REFERENCE = ("bn", "naive", "cbn", "cbn-diff"), (1, 2), ("bn", 32)


def run_priority(cfg: TrainConfig) -> tuple:
    key = not cfg.tag and ((cfg.norm in _KEY_NORMS and cfg.batch_size in _KEY_BATCHES)
                           or (cfg.norm, cfg.batch_size) == _REFERENCE)
    repeat = bool(cfg.tag) and cfg.seed > 0
    return (not key, repeat, cfg.seed, bool(cfg.tag), -_slots(cfg), cfg.batch_size, cfg.norm, cfg.tag)


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
    pending.sort(key=run_priority)
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


def _method(record: dict) -> str:
    """A run's method key: the norm kind, with its ablation tag (``cbn_k2``)."""
    tag = record["config"].get("tag", "")
    return f"{record['config']['norm']}_{tag}" if tag else record["config"]["norm"]


def _label(method: str) -> str:
    norm, _, tag = method.partition("_")
    return NORM_LABELS.get(norm, norm) + (f" [{tag}]" if tag else "")


def _by_seed(records: list[dict], key: str = "test_acc", source=None) -> dict[int, float]:
    values = {}
    for r in records:
        holder = r if source is None else r.get(source)
        if holder is not None and holder.get(key) is not None:
            values[r["config"]["seed"]] = float("nan") if r["diverged"] else holder[key]
    return values


PRECISE = "bn+precise"  # the precise-BN control: BN runs re-evaluated with recomputed statistics


def _cell(method: str, batch: int, records: list[dict], source=None) -> dict:
    test = _by_seed(records, "test_acc", source)
    train = _by_seed(records, "train_eval_acc", source)
    summary, train_summary = summarize(list(test.values())), summarize(list(train.values()))
    first = records[0]
    return {
        "method": method, "norm": first["config"]["norm"], "tag": first["config"].get("tag", ""),
        "batch_size": batch, "mean": summary.mean, "std": summary.std, "ci95": summary.ci95, "n": summary.n,
        "seeds": sorted(test), "test_acc": test, "train_eval_acc": train,
        "train_eval_mean": train_summary.mean, "train_eval_std": train_summary.std,
        "diverged": sum(bool(r["diverged"]) for r in records),
        "step_ms": statistics.fmean(statistics.fmean(e["step_ms"] for e in r["epochs"]) for r in records),
        "train_seconds": statistics.fmean(r["train_seconds"] for r in records),
        "window": first["protocol"]["window"], "burnin": first["protocol"]["burnin"],
        "lr": first["protocol"]["lr"], "global_batch": first["protocol"]["global_batch"],
        "epochs": first["config"]["epochs"], "total_steps": first["protocol"].get("total_steps"),
    }


def _fmt(cell: dict | None, train: bool = False) -> str:
    if cell is None or cell["n"] == 0:
        return "-"
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if math.isfinite(cell["ci95"]):
        text += f" [±{cell['ci95']:.1f}]"
    if train and math.isfinite(cell["train_eval_mean"]):
        text += f" / {cell['train_eval_mean']:.1f}"
    return text + f" (n={cell['n']})"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def report(sweep_dir: str | os.PathLike, against: str | os.PathLike | None = None) -> dict:
    """Aggregate the JSON records under ``sweep_dir/runs``: results.json, results.md, plots.

    ``against``: the ``summary.json`` of another sweep on the same protocol (the committed
    evidence grid); differentiable CBN is then also compared, paired by seed, with each of its
    methods at the same batch size and with BN at its largest batch ("(grid)" in the table).

    Cells hold mean, std and 95 % interval over seeds of the test accuracy, with the eval-mode
    train accuracy beside it; ``bn+precise`` is the precise-BN control (BN runs with recomputed
    population statistics). At every batch size <= 4, CBN is compared with BN, naive CBN and
    the control (Welch's and paired t-tests). Ablation variants get their own table.
    """
    sweep_dir = Path(sweep_dir)
    records = [json.loads(p.read_text()) for p in sorted((sweep_dir / "runs").glob("*.json"))]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((_method(r), r["config"]["batch_size"]), []).append(r)
    cells = [_cell(method, bs, rs) for (method, bs), rs in sorted(groups.items())]
    cells += [_cell(PRECISE, bs, rs, "precise_bn") for (method, bs), rs in sorted(groups.items())
              if method == "bn" and any("precise_bn" in r for r in rs)]
    lookup = {(c["method"], c["batch_size"]): c for c in cells}
    main_methods = [n for n in (*NORM_LABELS, PRECISE) if any(c["method"] == n for c in cells)]
    batch_sizes = sorted({c["batch_size"] for c in cells if not c["tag"]}, reverse=True)
    header = "| method | " + " | ".join(f"bs {b}" for b in batch_sizes) + " |"
    lines = [header, "|" + "---|" * (len(batch_sizes) + 1)]
    for method in main_methods:
        row = [_fmt(lookup.get((method, b)), train=True) for b in batch_sizes]
        lines.append(f"| {NORM_LABELS.get(method, 'BN + precise stats')} | " + " | ".join(row) + " |")
    table = "\n".join(lines)

    comparisons = []
    for b in (b for b in batch_sizes if b <= 4):
        # Each CBN kind against the other methods of its batch size (differentiable CBN also
        # against the paper's CBN).
        for method, others in (("cbn-diff", ("cbn", "naive", "bn", "gn", "brn", "syncbn", PRECISE)),
                               ("cbn", ("bn", "naive", PRECISE))):
            for other in others:
                cbn_cell, other_cell = lookup.get((method, b)), lookup.get((other, b))
                if cbn_cell and other_cell:
                    comparisons.append({"batch_size": b, "a": method, "b": other,
                                        **compare(cbn_cell["test_acc"], other_cell["test_acc"])})
    comparison_lines = ["| batch | comparison | difference (points) | Welch p | paired p (n pairs) |",
                        "|---|---|---|---|---|"]
    for c in comparisons:
        comparison_lines.append(
            f"| {c['batch_size']} | {NORM_LABELS[c['a']]} - {NORM_LABELS.get(c['b'], 'BN + precise stats')} | "
            f"{c['diff']:+.2f} | {_p(c['welch_p'])} | {_p(c['paired_p'])} ({c['n_pairs']}) |"
        )
    if against is not None:
        comparison_lines += _grid_comparisons(lookup, batch_sizes, json.loads(Path(against).read_text()))
    comparison_table = "\n".join(comparison_lines)

    ablation_cells = [c for c in cells if c["tag"]]
    ablation_lines = ["| variant | batch | window | burn-in (steps) | test acc / train acc (eval mode) |",
                      "|---|---|---|---|---|"]
    for c in sorted(ablation_cells, key=lambda c: (c["batch_size"], c["tag"][:2], c["window"], c["burnin"])):
        ablation_lines.append(f"| {_label(c['method'])} | {c['batch_size']} | {c['window']} | {c['burnin']} | "
                              f"{_fmt(c, train=True)} |")
    ablation_table = "\n".join(ablation_lines)

    results_path = sweep_dir / "results.json"
    results_path.write_text(json.dumps({"cells": cells, "comparisons": comparisons, "runs": records},
                                       indent=2, default=float))
    (sweep_dir / "results.md").write_text(
        "Test accuracy (%), mean ± std [± 95 % interval] / eval-mode train accuracy (n seeds).\n\n"
        + table + "\n\n" + reading(cells) + "\n\nCBN against the others at batch <= 4 (test accuracy):\n\n" + comparison_table
        + ("\n\nAblations:\n\n" + ablation_table if ablation_cells else "") + "\n"
    )
    plot_path = sweep_dir / "accuracy_vs_batch.png"
    main_cells = [c for c in cells if not c["tag"]]
    if main_cells:
        plot(main_cells, main_methods, plot_path)
    ablations_path = sweep_dir / "ablations.png" if ablation_cells else None
    if ablations_path is not None:
        plot_ablations(cells, ablations_path)
    curves_path = sweep_dir / "test_accuracy_vs_epoch.png"
    if plot_curves(groups, curves_path) is None:
        curves_path = None
    return {"table": table, "reading": reading(cells), "comparisons": comparison_table, "ablations": ablation_table if ablation_cells else "",
            "plot": str(plot_path), "ablation_plot": str(ablations_path) if ablations_path else None, "curves": str(curves_path) if curves_path else None,
            "results": str(results_path), "cells": cells}


def _grid_comparisons(lookup: dict, batch_sizes: list[int], summary: dict) -> list[str]:
    """Table rows: differentiable CBN against the cells of another sweep's summary, by seed."""
    grid = {(c["method"], c["batch_size"]): c for c in summary["cells"] if not c["tag"]}
    largest = max(b for m, b in grid if m == "bn")
    lines = []
    for b in (b for b in batch_sizes if b <= 4):
        ours = lookup.get(("cbn-diff", b))
        if ours is None:
            continue
        for other, other_batch in (*(((m, b)) for m in ("bn", "gn", "brn", "syncbn", PRECISE)), ("bn", largest)):
            cell = grid.get((other, other_batch))
            if cell is None:
                continue
            c = compare(ours["test_acc"], {int(seed): acc for seed, acc in cell["test_acc"].items()})
            label = NORM_LABELS.get(other, "BN + precise stats") + (f" at batch {other_batch}" if other_batch != b else "")
            lines.append(f"| {b} | CBN (differentiable) - {label} (grid) | {c['diff']:+.2f} | {_p(c['welch_p'])} | "
                         f"{_p(c['paired_p'])} ({c['n_pairs']}) |")
    return lines


def reading(cells: list[dict]) -> str:
    """One sentence on the smallest batch size: how far BN falls, and what CBN, naive CBN and the
    precise-BN control do there (empty when BN at that size or at the largest is missing)."""
    lookup = {(c["method"], c["batch_size"]): c for c in cells if not c["tag"]}
    sizes = sorted({b for m, b in lookup if m == "bn"})
    if len(sizes) < 2:
        return ""
    small, large = sizes[0], sizes[-1]
    bn, reference = lookup[("bn", small)], lookup[("bn", large)]
    text = (f"Reading: at batch {small} BN reaches {bn['mean']:.1f} % test accuracy against {reference['mean']:.1f} % "
            f"at batch {large} (eval-mode train accuracy {bn['train_eval_mean']:.1f} %: the train/test gap of batch "
            "statistics)")
    parts = [f"{NORM_LABELS.get(m, 'BN with precise statistics')} {lookup[(m, small)]['mean']:.1f} %"
             for m in ("cbn-diff", "cbn", "naive", PRECISE) if (m, small) in lookup]
    return text + ("; at the same batch " + ", ".join(parts) if parts else "") + "."


def plot(cells: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    markers = {"bn": "o", "brn": "s", "gn": "^", "naive": "v", "cbn": "D", "cbn-diff": "P", "syncbn": "x", PRECISE: "."}
    for method in methods:
        cs = sorted((c for c in cells if c["method"] == method), key=lambda c: c["batch_size"])
        xs = [c["batch_size"] for c in cs]
        errors = [c["ci95"] if math.isfinite(c["ci95"]) else 0.0 for c in cs]
        ax.errorbar(xs, [c["mean"] for c in cs], yerr=errors, marker=markers.get(method, "o"), capsize=3,
                    label=NORM_LABELS.get(method, "BN + precise stats"), linewidth=2 if method == "cbn" else 1.2,
                    linestyle=":" if method == PRECISE else "-")
    ax.set_xscale("log", base=2)
    all_bs = sorted({c["batch_size"] for c in cells})
    ax.set_xticks(all_bs)
    ax.set_xticklabels([str(b) for b in all_bs])
    ax.invert_xaxis()
    ax.set_xlabel("batch size per iteration (per process for SyncBN)")
    ax.set_ylabel("test accuracy (%), mean and 95 % interval")
    ax.set_title("Fashion-MNIST: accuracy vs batch size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablations(cells: list[dict], path: Path) -> None:
    """Test accuracy of the ablated CBN kind (paper or differentiable, whichever the sweep ablates)
    against the window ``k`` and against the burn-in fraction, at the ablation batch size; the main
    table's cell of that kind there is the protocol's own point of both curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [c for c in cells if c["tag"] and c["norm"] in ("cbn", "cbn-diff")]
    norm, batch = variants[0]["norm"], variants[0]["batch_size"]
    variants = [c for c in variants if c["norm"] == norm]
    # The protocol's own point, over the seeds the variants ran (comparable seed for seed).
    seeds = {seed for c in variants for seed in c["test_acc"]}
    base = []
    for c in cells:
        if c["method"] == norm and c["batch_size"] == batch:
            test = [v for seed, v in c["test_acc"].items() if seed in seeds]
            train = [v for seed, v in c["train_eval_acc"].items() if seed in seeds]
            summary = summarize(test)
            base.append({**c, "mean": summary.mean, "ci95": summary.ci95, "train_eval_mean": summarize(train).mean})
    panels = (("window k", lambda c: c["window"], lambda c: c["tag"].startswith("k")),
              ("burn-in (fraction of training)", lambda c: c["burnin"] / max(1, c["total_steps"] or 1),
               lambda c: c["tag"].startswith("burnin")))
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for ax, (label, x_of, member) in zip(axes, panels):
        points = sorted(((x_of(c), c) for c in [*base, *(c for c in variants if member(c))]), key=lambda p: p[0])
        if not points:
            continue
        errors = [c["ci95"] if math.isfinite(c["ci95"]) else 0.0 for _, c in points]
        ax.errorbar([x for x, _ in points], [c["mean"] for _, c in points], yerr=errors, marker="D", capsize=3,
                    label="test")
        ax.plot([x for x, _ in points], [c["train_eval_mean"] for _, c in points], marker="o", linestyle="--",
                label="train (eval mode)")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_xscale("log", base=2)
    fig.suptitle(f"{NORM_LABELS[norm]} ablations at batch {batch} (mean and 95 % interval over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(groups: dict[tuple[str, int], list[dict]], path: Path) -> Path | None:
    """Test accuracy against epoch (mean over seeds) for BN, naive CBN and CBN at the smallest batch
    size where all three ran with per-epoch evaluation; ``None`` when there is none."""
    batches = sorted(b for (m, b) in groups if m == "cbn" and all((n, b) in groups for n in ("bn", "naive")))
    per_epoch = [b for b in batches if all(len([e for e in r["epochs"] if "test_acc" in e]) > 1
                                           for n in ("bn", "naive", "cbn") for r in groups[(n, b)])]
    if not per_epoch:
        return None
    batch = per_epoch[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in [m for m in ("bn", "naive", "cbn", "cbn-diff") if (m, batch) in groups]:
        by_epoch: dict[int, list[float]] = {}
        for r in groups[(method, batch)]:
            for e in r["epochs"]:
                if "test_acc" in e:
                    by_epoch.setdefault(e["epoch"], []).append(e["test_acc"])
        epochs = sorted(by_epoch)
        ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", label=NORM_LABELS[method])
    protocol = groups[("cbn", batch)][0]["protocol"]
    burnin_epochs = protocol["burnin"] / max(1, protocol["steps_per_epoch"])
    ax.axvline(burnin_epochs, color="grey", linestyle=":", label="CBN burn-in ends")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title(f"Fashion-MNIST, batch {batch}: test accuracy during training")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
