"""Training-step cost under ``torch.compile(fullgraph=True)``: compiled CBN against compiled
BatchNorm and the compiled floor (BatchNorm plus one weight-gradient convolution per layer,
``benchmarks.train_step.WeightGradFloor``) on the project's ResNet-20, with the eager ratios of
the same run beside them.

Run from the repository root::

    PYTHONPATH=src:. python -m benchmarks.compiled_step --md docs/performance.md

Each model is compiled (inductor) after one eager training forward, which pairs the CBN layers
with their convolutions; the compile time is the wall time of the first compiled steps, with
the compiler's caches off, so that it is the cold time whatever ran before. Steps
are then timed round-robin with the eager models of the same seed; medians, ratios to the
BatchNorm of the same mode.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.train_step import Trainer, _data, build, interleave, rounded, run_section

LABELS = {"bn": "BatchNorm", "floor": "floor (BN + 1 wgrad conv)", "naive": "naive CBN", "cbn": "CBN"}


def compiled_trainer(variant: str, batch: int, window: int, seed: int, backend: str) -> tuple[Trainer, float]:
    """A trainer of the compiled model and the seconds its first two steps took (compilation)."""
    x, target = _data(batch, seed)
    model = build(variant, window, seed)
    model.train()(x)  # the eager forward that pairs the layers
    trainer = Trainer(torch.compile(model, backend=backend, fullgraph=True), x, target)
    start = time.perf_counter()
    for _ in range(2):
        trainer.step()
    return trainer, time.perf_counter() - start


def measure(args, log) -> list[dict]:
    if "bn" not in args.variants:
        args.variants = ["bn", *args.variants]
    rows = []
    for batch in args.batch_sizes:
        trainers, compile_s = {}, {}
        for variant in args.variants:
            trainers[f"{variant} compiled"], compile_s[variant] = compiled_trainer(
                variant, batch, args.window, args.seed, args.backend)
            trainers[f"{variant} eager"] = Trainer(build(variant, args.window, args.seed), *_data(batch, args.seed))
        for trainer in trainers.values():
            for _ in range(args.window + 2):
                trainer.step()
        times = interleave({k: t.step for k, t in trainers.items()}, args.steps)
        medians = {k: statistics.median(v) for k, v in times.items()}
        for mode in ("compiled", "eager"):
            for variant in args.variants:
                rows.append({
                    "batch": batch, "mode": mode, "variant": variant, "window": args.window,
                    "ms": 1e3 * medians[f"{variant} {mode}"],
                    "ratio": medians[f"{variant} {mode}"] / medians[f"bn {mode}"],
                    "compile_s": compile_s[variant] if mode == "compiled" else None,
                })
        log(f"batch {batch}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in medians.items())
            + "; compile " + ", ".join(f"{v} {s:.0f} s" for v, s in compile_s.items()))
    return rows


def markdown(rows: list[dict], command: str, machine: dict) -> str:
    lines = [
        "### Compiled training step (`torch.compile(fullgraph=True)`)",
        "",
        f"`{command}` (commit {machine.get('git_commit')}, {machine.get('threads')} thread(s), "
        f"load average at start {rounded(machine['load_average_start'])}). ResNet-20, window 4, SGD; medians of "
        "interleaved rounds; compile time is the wall time of the first two compiled steps.",
        "",
        "| batch | mode | method | step | x BatchNorm (same mode) | compile time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        compile_s = f"{r['compile_s']:.0f} s" if r["compile_s"] is not None else "-"
        lines.append(f"| {r['batch']} | {r['mode']} | {LABELS[r['variant']]} | {r['ms']:.1f} ms | "
                     f"{r['ratio']:.2f}x | {compile_s} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def statistic_gradient_layout(traced: bool) -> Iterator[None]:
    """With ``traced``, compile CBN as before its statistic-gradient convolutions took the layout
    inductor gives convolutions (``cbn.functional.statistic_gradients._in_compiled_convolution_layout``):
    the "before" of a comparison across runs. Holds for the whole run, so no guard sees a change."""
    import cbn.functional.statistic_gradients as statistic_gradients

    decision = statistic_gradients._inductor_keeps_convolutions_channels_last
    if traced:
        statistic_gradients._inductor_keeps_convolutions_channels_last = torch.compiler.assume_constant_result(
            lambda device_type: False)
    try:
        yield
    finally:
        statistic_gradients._inductor_keeps_convolutions_channels_last = decision


def add_traced_layout_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traced-layout", action="store_true",
                   help="statistic-gradient convolutions in the traced layout (as before the layout matching)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled_step", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 32])
    p.add_argument("--variants", nargs="+", choices=tuple(LABELS), default=list(LABELS))
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no C++ build)")
    p.add_argument("--md", type=Path, default=None, help="write the section into this markdown file")
    add_traced_layout_argument(p)
    return p.parse_args(argv)


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    with statistic_gradient_layout(args.traced_layout), torch.compiler.config.patch(force_disable_caches=True):
        rows, _ = run_section("compiled_step", "compiled", args, argv, measure, markdown)
    return rows


if __name__ == "__main__":
    run()
