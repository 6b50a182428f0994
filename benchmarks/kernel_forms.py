"""The C++ kernels against their Python forms, one operation at a time.

Run from the repository root::

    PYTHONPATH=src:. python -m benchmarks.kernel_forms --md docs/performance.md

Two operations, each timed round-robin in both forms (``cbn.kernels.use_kernels``), medians:

1. the pooled normalization, forward with autograd and backward (``torch.autograd.grad``), at
   the shapes of ResNet-20's first stage at batch 1 and 32, with ``F.batch_norm`` beside it;
2. the Taylor products of a window of 3 entries (``statistic_shifts_of_layers``) at the weight
   shapes of ResNet-20 (16 x 144, 64 x 576) and of ResNet-50's largest layer (512 x 4608).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.train_step import median_microseconds, rounded, run_section


def _in_form(fn, kernels: bool):
    import cbn.kernels

    def call():
        with cbn.kernels.use_kernels(kernels):
            return fn()

    return call


def normalization_case(batch: int, channels: int, size: int) -> dict:
    from cbn.functional import cross_iteration_batch_norm, pool_past

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).requires_grad_()
    weight = (torch.rand(channels, generator=gen) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=gen).requires_grad_()
    grad = torch.randn(batch, channels, size, size, generator=gen)
    past = pool_past(torch.randn(3, channels, generator=gen), torch.rand(3, channels, generator=gen) + 0.1,
                     torch.ones(3, 1))

    def cbn_step():
        out, _ = cross_iteration_batch_norm(x, past, weight, bias, 1e-5)
        return torch.autograd.grad(out, (x, weight, bias), grad)

    def batchnorm_step():
        out = F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
        return torch.autograd.grad(out, (x, weight, bias), grad)

    return {"what": "normalization, forward + backward", "shape": f"{batch}x{channels}x{size}x{size}",
            "forms": {"kernels": _in_form(cbn_step, True), "python": _in_form(cbn_step, False),
                      "batchnorm": batchnorm_step}}


def products_case(channels: int, fan_in: int) -> dict:
    from cbn.functional.statistic_gradients import statistic_shifts_of_layers

    gen = torch.Generator().manual_seed(0)
    # The window's three slots, each entry's tensors of its own.
    operands = [([torch.randn(1, fan_in, generator=gen) for _ in range(3)],
                 [torch.randn(channels, fan_in, generator=gen) for _ in range(3)],
                 torch.randn(channels, fan_in, generator=gen), torch.randn(channels, generator=gen))]

    def step():
        with torch.no_grad():
            return statistic_shifts_of_layers(operands)

    return {"what": "Taylor products, window of 3", "shape": f"{channels}x{fan_in}",
            "forms": {"kernels": _in_form(step, True), "python": _in_form(step, False)}}


def measure(args, log) -> list[dict]:
    import cbn.kernels

    if not cbn.kernels.available():
        raise RuntimeError("the C++ kernels are not available: nothing to compare")
    cases = [normalization_case(batch, 16, 28) for batch in args.batch_sizes]
    cases += [products_case(channels, fan_in) for channels, fan_in in ((16, 144), (64, 576), (512, 4608))]
    rows = []
    for case in cases:
        forms = case["forms"]
        rounds = args.rounds if case["shape"] != "512x4608" else max(3, args.rounds // 20)
        row = {"what": case["what"], "shape": case["shape"], "rounds": rounds,
               **{f"{form}_us": us for form, us in median_microseconds(forms, rounds).items()}}
        rows.append(row)
        log(f"{row['what']} {row['shape']}: " + ", ".join(
            f"{form} {row[f'{form}_us']:.1f} us" for form in forms))
    return rows


def markdown(rows: list[dict], command: str, machine: dict) -> str:
    lines = [
        "### The C++ kernels against their Python forms",
        "",
        f"`{command}` (commit {machine.get('git_commit')}, {machine.get('threads')} thread(s), load "
        f"average at start {rounded(machine['load_average_start'])}). Median time per call of the "
        "forms interleaved round-robin; the normalization includes its backward "
        "(`torch.autograd.grad`), `F.batch_norm` beside it.",
        "",
        "| operation | shape | C++ kernels | Python form | F.batch_norm |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        batchnorm = f"{r['batchnorm_us']:.1f} us" if "batchnorm_us" in r else "-"
        lines.append(f"| {r['what']} | {r['shape']} | {r['kernels_us']:.1f} us | {r['python_us']:.1f} us "
                     f"| {batchnorm} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_forms", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=200, help="interleaved rounds (a twentieth at ResNet-50 size)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--md", type=Path, default=None, help="write the section into this markdown file")
    return p.parse_args(argv)


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows, _ = run_section("kernel_forms", "kernel-forms", args, argv, measure, markdown)
    return rows


if __name__ == "__main__":
    run()
