"""The dense-task study: methods x batch sizes x seeds of :mod:`cbn.experiments.segmentation`.

One run at a time (the study is sized for one core), each in its own subprocess
``python -m cbn.experiments.segmentation CONFIG.json`` with ``OMP_NUM_THREADS=1``, so each run
imports the code as it is when the run starts and records that commit. A run is finished when
its JSON record ``<out>/runs/<method>_bs<batch>_seed<seed>.json`` exists (written atomically):
an interrupted study resumes where it stopped. ``--commit-every SECONDS`` commits the records
to git as they accumulate.

Commands::

    python -m cbn.experiments.dense_sweep --out docs/data/dense              # run what is missing, then summary
    python -m cbn.experiments.dense_sweep summary --out docs/data/dense      # table, JSON, plot from the records
    python -m cbn.experiments.dense_sweep --out DIR --methods bn cbn --batch-sizes 16 2 --seeds 0 1 \\
        --set images=2000 --method 'cbn_k4={"kind": "cbn", "convert": {"compensate": true}, "window": 4}'

The summary (``results.md``, ``summary.json``, ``miou_vs_batch.png``) gives per cell the mean, the
sample std and the 95 % interval (Student's t) of the test mIoU over seeds with the eval-mode train
mIoU beside it, and compares every cell with a reference cell (BN at the largest batch by
default) and with BN at the same batch: difference of means, Welch's and the paired t-test by seed
(:mod:`cbn.experiments.significance`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from cbn.experiments.segmentation import METHODS, Method, SegConfig, _format_seconds
from cbn.experiments.significance import compare, summarize

PRECISE = "bn+precise"  # BN runs evaluated with recomputed population statistics
# Config entries that do not change what a run computes (ignored when checking a record).
_BOOKKEEPING = ("out", "progress", "data_dir", "threads")


@dataclass(frozen=True)
class StudySpec:
    """Methods x batch sizes x seeds; ``small_batch_seeds`` at batch sizes ``<= small_batch``.

    ``methods`` name entries of :data:`cbn.experiments.segmentation.METHODS` or of
    ``extra_methods`` (name -> :class:`Method` fields as a dict). ``base`` holds the
    :class:`SegConfig` values shared by every run. ``skip`` lists ``(method, batch)`` cells not to
    run.
    """

    methods: tuple = ("bn", "gn", "brn", "naive", "cbn")
    batch_sizes: tuple = (16, 2, 1)
    seeds: tuple = (0, 1)
    small_batch_seeds: tuple = (0, 1, 2)
    small_batch: int = 2
    base: dict = field(default_factory=dict)
    extra_methods: dict = field(default_factory=dict)
    skip: tuple = ()

    def method(self, name: str) -> Method:
        if name in self.extra_methods:
            return Method(**self.extra_methods[name])
        if name in METHODS:
            return METHODS[name]
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS) + sorted(self.extra_methods)}")

    def seeds_for(self, batch: int) -> tuple:
        return self.small_batch_seeds if self.small_batch_seeds and batch <= self.small_batch else self.seeds

    def configs(self, out: str) -> list[SegConfig]:
        """Every run of the study, in the order it runs (see :func:`run_priority`)."""
        runs = []
        base = SegConfig(**{**self.base, "out": str(Path(out) / "runs"), "progress": True})
        for name in self.methods:
            method = self.method(name)
            for batch in self.batch_sizes:
                if (name, batch) in {tuple(s) for s in self.skip}:
                    continue
                for seed in self.seeds_for(batch):
                    runs.append(replace(base.with_method(name, method), batch_size=batch, seed=seed))
        order = {name: i for i, name in enumerate(self.methods)}
        return sorted(runs, key=lambda c: run_priority(c, order, max(self.batch_sizes)))


def run_priority(cfg: SegConfig, method_order: dict, large: int) -> tuple:
    """BN at the large batch, at batch 2 and at batch 1 first (the regime check), then seeds 0 and 1
    of every method at batch 1 (where BN fails in the pilots), then batch 2, then the large batch;
    third seeds last. A cut study still holds the paired comparisons at batch 1."""
    if cfg.method == "bn" and cfg.batch_size in (large, 2, 1) and cfg.seed < 2:
        return (0, cfg.seed, -cfg.batch_size)
    batch_rank = {1: 0, 2: 1}.get(cfg.batch_size, 2)
    return (1, cfg.seed >= 2, batch_rank, cfg.seed, method_order.get(cfg.method, 99), cfg.batch_size)


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _BOOKKEEPING}


def _planned_config(cfg: SegConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as in a record


def record_path(cfg: SegConfig) -> Path:
    return Path(cfg.out) / f"{cfg.run_name()}.json"


def _launch(cfg: SegConfig) -> int:
    """Run one configuration in a subprocess (output to ours); returns its exit status."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(asdict(cfg), handle)
        config_path = handle.name
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        return subprocess.run([sys.executable, "-m", "cbn.experiments.segmentation", config_path], env=env).returncode
    finally:
        os.unlink(config_path)


def _commit_records(out: Path, message: str) -> None:
    """``git add`` + ``git commit`` of ``out`` only (other staged changes are left alone)."""
    try:
        subprocess.run(["git", "add", str(out)], check=True, capture_output=True)
        staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", str(out)])
        if staged.returncode == 1:
            subprocess.run(["git", "commit", "-q", "-m", message, "--", str(out)], check=True, capture_output=True)
            print(f"[study] committed: {message}", flush=True)
    except (OSError, subprocess.CalledProcessError) as error:  # e.g. a concurrent git command
        print(f"[study] commit skipped ({error})", flush=True)


def _estimate(cfg: SegConfig, durations: dict) -> float | None:
    """Expected wall seconds of a run: the mean of finished runs of its cell, else of its batch
    (scaled by the steps), else of all runs."""
    same = durations.get((cfg.method, cfg.batch_size))
    if same:
        return sum(same) / len(same)
    batch = [t for (m, b), ts in durations.items() if b == cfg.batch_size for t in ts]
    if batch:
        return sum(batch) / len(batch)
    every = [t for ts in durations.values() for t in ts]
    return sum(every) / len(every) if every else None


def run_study(spec: StudySpec, out: str, commit_every: float | None = None, dry_run: bool = False) -> dict:
    """Run every missing run of ``spec`` (one at a time), then :func:`summary`."""
    out_dir = Path(out)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.json").write_text(json.dumps(asdict(spec), indent=2, default=list))
    configs = spec.configs(out)
    done, pending = [], []
    for cfg in configs:
        path = record_path(cfg)
        if not path.exists():
            pending.append(cfg)
            continue
        done.append(cfg)
        recorded = _comparable(json.loads(path.read_text())["config"])
        planned = _comparable(_planned_config(cfg))
        differs = sorted(k for k in set(recorded) | set(planned) if recorded.get(k) != planned.get(k))
        if differs:
            print(f"[study] warning: {path.name} was recorded with a different config "
                  f"({', '.join(f'{k}: {recorded.get(k)!r} -> {planned.get(k)!r}' for k in differs)}); kept",
                  flush=True)
    print(f"[study] {len(configs)} runs, {len(done)} recorded, {len(pending)} to run", flush=True)
    if dry_run:
        for i, cfg in enumerate(pending):
            print(f"  {i + 1}. {cfg.run_name()}")
        return {}
    durations: dict = {}
    for cfg in done:
        record = json.loads(record_path(cfg).read_text())
        durations.setdefault((cfg.method, cfg.batch_size), []).append(record.get("wall_seconds", 0.0))
    t0 = time.perf_counter()
    last_commit = time.perf_counter()
    failures = []
    for index, cfg in enumerate(pending):
        if record_path(cfg).exists():  # (another process of the same study, a second lane, ran it meanwhile)
            print(f"[study] run {len(done) + index + 1}/{len(configs)}: {cfg.run_name()} recorded meanwhile "
                  "by another process: skipped", flush=True)
            continue
        estimates = [_estimate(c, durations) for c in pending[index:]]
        known = [e for e in estimates if e is not None]
        eta = "unknown" if not known else _format_seconds(sum(known) * len(estimates) / len(known))
        print(f"[study] run {len(done) + index + 1}/{len(configs)}: {cfg.run_name()}  "
              f"(study elapsed {_format_seconds(time.perf_counter() - t0)}, ETA {eta})", flush=True)
        started = time.perf_counter()
        status = _launch(cfg)
        if status != 0 or not record_path(cfg).exists():
            failures.append(cfg.run_name())
            print(f"[study] FAILED: {cfg.run_name()} (exit {status})", flush=True)
            continue
        durations.setdefault((cfg.method, cfg.batch_size), []).append(time.perf_counter() - started)
        if commit_every is not None and time.perf_counter() - last_commit >= commit_every:
            finished = len(list((out_dir / "runs").glob("*.json")))
            _commit_records(out_dir, f"dense study: {finished} of {len(configs)} run records")
            last_commit = time.perf_counter()
    if failures:
        print(f"[study] failed runs: {', '.join(failures)}", flush=True)
    result = summary(out)
    if commit_every is not None:
        finished = len(list((out_dir / "runs").glob("*.json")))
        _commit_records(out_dir, f"dense study: {finished} of {len(configs)} run records, summary")
    return result


# ----------------------------------------------------------------------------- summary


def _by_seed(records: list[dict], key: str, source: str | None = None) -> dict[int, float]:
    values = {}
    for r in records:
        holder = r if source is None else r.get(source)
        if holder is not None and holder.get(key) is not None:
            values[r["config"]["seed"]] = float("nan") if r["diverged"] else float(holder[key])
    return values


def _cell(method: str, batch: int, records: list[dict], source: str | None = None) -> dict:
    test = _by_seed(records, "test_miou", source)
    train = _by_seed(records, "train_miou", source)
    pixel = _by_seed(records, "test_pixel_acc", source)
    s, t, p = summarize(list(test.values())), summarize(list(train.values())), summarize(list(pixel.values()))
    first = records[0]
    return {"method": method, "batch_size": batch, "mean": s.mean, "std": s.std, "ci95": s.ci95, "n": s.n,
            "test_miou": test, "train_miou": train, "train_mean": t.mean, "pixel_acc_mean": p.mean,
            "diverged": sum(bool(r["diverged"]) for r in records),
            "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in records) / len(records),
            "step_ms": sum(r.get("step_ms", 0.0) for r in records) / len(records),
            "lr": first["protocol"]["lr"], "window": first["protocol"]["window"],
            "burnin": first["protocol"]["burnin"], "steps": first["protocol"]["total_steps"],
            "commits": sorted({r.get("commit", "unknown") for r in records})}


def _fmt(cell: dict | None) -> str:
    if cell is None or cell["n"] == 0:
        return "-" if cell is None else f"diverged ({cell['diverged']})"
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if math.isfinite(cell["ci95"]):
        text += f" [±{cell['ci95']:.1f}]"
    if math.isfinite(cell["train_mean"]):
        text += f" / {cell['train_mean']:.1f}"
    return text + f" (n={cell['n']})"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _labels(out_dir: Path) -> tuple[dict, list]:
    """Method labels and order: the spec's methods first, then any other recorded method."""
    labels = {name: m.label or name for name, m in METHODS.items()}
    order = list(METHODS)
    spec_path = out_dir / "spec.json"
    if spec_path.exists():
        spec = json.loads(spec_path.read_text())
        for name, values in spec.get("extra_methods", {}).items():
            labels[name] = values.get("label") or name
        order = list(spec.get("methods", [])) + [m for m in order if m not in spec.get("methods", [])]
    labels[PRECISE] = "BN + precise stats"
    return labels, order


def summary(out: str, reference: str | None = None) -> dict:
    """Table, comparisons, ``summary.json`` and ``miou_vs_batch.png`` from ``<out>/runs/*.json``.

    Args:
        out: the study directory.
        reference: ``method@batch`` every cell is compared with (default: BN at the largest batch).
    """
    out_dir = Path(out)
    records = [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*.json"))]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["config"]["method"], r["config"]["batch_size"]), []).append(r)
    cells = [_cell(m, b, rs) for (m, b), rs in sorted(groups.items())]
    cells += [_cell(PRECISE, b, rs, "precise_bn") for (m, b), rs in sorted(groups.items())
              if m == "bn" and any("precise_bn" in r for r in rs)]
    lookup = {(c["method"], c["batch_size"]): c for c in cells}
    labels, order = _labels(out_dir)
    methods = [m for m in [*order, PRECISE] if any(c["method"] == m for c in cells)]
    methods += sorted({c["method"] for c in cells} - set(methods))
    batches = sorted({c["batch_size"] for c in cells}, reverse=True)
    lines = ["| method | " + " | ".join(f"bs {b}" for b in batches) + " |", "|" + "---|" * (len(batches) + 1)]
    for m in methods:
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(_fmt(lookup.get((m, b))) for b in batches) + " |")
    table = "\n".join(lines)

    if reference is None and batches:
        reference = f"bn@{batches[0]}"
    comparisons = []
    ref_cell = None
    if reference:
        ref_method, _, ref_batch = reference.partition("@")
        ref_cell = lookup.get((ref_method, int(ref_batch)))
    for b in batches:
        for m in methods:
            cell = lookup.get((m, b))
            if cell is None:
                continue
            against = []
            if ref_cell is not None and cell is not ref_cell:
                against.append((reference, ref_cell))
            bn_here = lookup.get(("bn", b))
            if bn_here is not None and m != "bn" and (ref_cell is None or bn_here is not ref_cell):
                against.append((f"bn@{b}", bn_here))
            for name, other in against:
                comparisons.append({"a": f"{m}@{b}", "b": name, **compare(cell["test_miou"], other["test_miou"])})
    comp_lines = ["| cell | against | difference (mIoU points) | Welch p | paired p (n pairs) |", "|---|---|---|---|---|"]
    for c in comparisons:
        a_method, _, a_batch = c["a"].partition("@")
        b_method, _, b_batch = c["b"].partition("@")
        comp_lines.append(f"| {labels.get(a_method, a_method)} @ {a_batch} | {labels.get(b_method, b_method)} @ {b_batch} | "
                          f"{c['diff']:+.2f} | {_p(c['welch_p'])} | {_p(c['paired_p'])} ({c['n_pairs']}) |")
    comparison_table = "\n".join(comp_lines)
    text = reading(lookup, batches, labels)
    total_seconds = sum(r.get("wall_seconds", 0.0) for r in records)
    header = (f"Dense task (semantic segmentation of composed Fashion-MNIST scenes): test mIoU (%, 11 classes), "
              f"mean ± std [± 95 % interval] / eval-mode train mIoU (n seeds). {len(records)} runs, "
              f"{total_seconds / 3600:.2f} core-hours of wall time.\n\n")
    (out_dir / "results.md").write_text(header + table + "\n\n" + text + "\n\nComparisons (test mIoU):\n\n"
                                        + comparison_table + "\n")
    summary_json = {"cells": cells, "comparisons": comparisons, "reference": reference, "reading": text,
                    "runs": [r["name"] for r in records], "core_hours": total_seconds / 3600}
    (out_dir / "summary.json").write_text(json.dumps(summary_json, indent=2, default=float))
    plot_path = out_dir / "miou_vs_batch.png"
    if cells:
        plot(cells, methods, labels, plot_path)
    return {"table": table, "comparisons": comparison_table, "reading": text, "cells": cells,
            "summary": str(out_dir / "summary.json"), "plot": str(plot_path)}


def reading(lookup: dict, batches: list, labels: dict) -> str:
    """One sentence: how far BN at batch 2 falls below BN at the largest batch (the regime check)."""
    if not batches or ("bn", 2) not in lookup or ("bn", batches[0]) not in lookup or batches[0] == 2:
        return ""
    small, large = lookup[("bn", 2)], lookup[("bn", batches[0])]
    c = compare(small["test_miou"], large["test_miou"])
    return (f"Reading: BN at batch 2 reaches {small['mean']:.2f} test mIoU against {large['mean']:.2f} at batch "
            f"{batches[0]} ({c['diff']:+.2f} points, paired p {_p(c['paired_p'])} over {c['n_pairs']} seeds; "
            f"eval-mode train mIoU {small['train_mean']:.1f} against {large['train_mean']:.1f}).")


def plot(cells: list[dict], methods: list[str], labels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for m in methods:
        cs = sorted((c for c in cells if c["method"] == m and c["n"] > 0), key=lambda c: c["batch_size"])
        if not cs:
            continue
        ax.errorbar([c["batch_size"] for c in cs], [c["mean"] for c in cs],
                    yerr=[c["ci95"] if math.isfinite(c["ci95"]) else 0.0 for c in cs], marker="o", capsize=3,
                    label=labels.get(m, m), linestyle=":" if m == PRECISE else "-")
    sizes = sorted({c["batch_size"] for c in cells})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.invert_xaxis()
    ax.set_xlabel("batch size per iteration (per process for SyncBN)")
    ax.set_ylabel("test mIoU (%), mean and 95 % interval")
    ax.set_title("Composed Fashion-MNIST scenes: segmentation mIoU vs batch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- presets and CLI


# The study of the dense task; docs/data/dense/PILOT.md gives the pilots that chose it: a 5-level
# FCN (4x4 statistics at the coarsest level on 64x64 scenes) and per-scene contrast / background
# variation, where BN at batch 1 fails. Cross-iteration methods at the large batch would have a
# window of 1 (plain BN), and SyncBN there would double the batch: those cells are not run.
DENSE = StudySpec(
    methods=("bn", "gn", "brn", "naive", "cbn", "cbn-diff", "syncbn"),
    batch_sizes=(16, 2, 1),
    seeds=(0, 1),
    small_batch_seeds=(0, 1, 2),
    base={"arch": "fcn", "widths": (8, 16, 32, 64, 128), "base_lr": 0.2, "photometric": 0.8},
    skip=(("naive", 16), ("cbn", 16), ("cbn-diff", 16), ("syncbn", 16)),
)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cbn.experiments.dense_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "summary"), default="run")
    parser.add_argument("--out", default="runs/dense", help="study directory (records under OUT/runs)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"default {list(DENSE.methods)}")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds above small-batch")
    parser.add_argument("--small-batch-seeds", nargs="+", type=int, default=None)
    parser.add_argument("--method", action="append", default=[], metavar="NAME=JSON",
                        help='an extra method, e.g. cbn_diff=\'{"kind": "cbn", "convert": {"compensate": true}}\'')
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a SegConfig value for every run (JSON value), e.g. images=2000")
    parser.add_argument("--skip", action="append", default=[], metavar="METHOD@BATCH", help="a cell not to run")
    parser.add_argument("--reference", default=None, help="summary: cell to compare with (default bn@largest)")
    parser.add_argument("--commit-every", type=float, default=None, metavar="SECONDS",
                        help="git-commit OUT after a run when this long has passed since the last commit")
    parser.add_argument("--dry-run", action="store_true", help="list the runs still to do")
    return parser


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    known = {f.name for f in fields(SegConfig)}
    base = dict(DENSE.base)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"--set: unknown SegConfig field {key!r}")
        base[key] = _parse_value(value)
    extra = dict(DENSE.extra_methods)
    for item in args.method:
        name, _, value = item.partition("=")
        extra[name] = json.loads(value)
    methods = tuple(args.methods) if args.methods else DENSE.methods
    for name in args.method:
        n = name.partition("=")[0]
        if n not in methods:
            methods += (n,)
    skip = tuple((m, int(b)) for m, _, b in (s.partition("@") for s in args.skip)) + tuple(DENSE.skip)
    return replace(DENSE, methods=methods, base=base, extra_methods=extra, skip=skip,
                   batch_sizes=tuple(args.batch_sizes) if args.batch_sizes else DENSE.batch_sizes,
                   seeds=tuple(args.seeds) if args.seeds else DENSE.seeds,
                   small_batch_seeds=tuple(args.small_batch_seeds) if args.small_batch_seeds else DENSE.small_batch_seeds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "summary":
        result = summary(args.out, args.reference)
    else:
        result = run_study(spec_from_args(args), args.out, args.commit_every, args.dry_run)
        if args.dry_run:
            return 0
    print(result["table"] + "\n\n" + result["reading"] + "\n\n" + result["comparisons"])
    print(f"\nsummary: {result['summary']}  plot: {result['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
