"""Below the floor? The statistic rows stacked onto the producer's own weight-gradient convolution.

Run from the repository root::

    PYTHONPATH=src:. python -m benchmarks.stacked_weight_gradient --md docs/performance.md

CBN's floor is BatchNorm plus one weight-gradient convolution per normalized layer: the variance
rows ``d var / dW = 2 / m * sum (y - mu) x_patch`` are the weight gradient of the producer for the
output gradient ``y - mu`` (times ``2 / m``). The producer's backward already runs one
weight-gradient convolution, for the loss gradient ``g``, over the same input. The one way below
the floor would be a single convolution for both, with ``[g | y - mu]`` (``2 C`` output
channels) as its output gradient, if one convolution with ``2 C`` rows cost less than two with
``C``. Three forms of ``aten.convolution_backward`` (weight only), timed round-robin, medians:

- **producer**: the producer's own weight gradient, what BatchNorm pays;
- **separate**: that plus a second call for the statistic rows, what CBN pays (the floor);
- **stacked**: one call with the two output gradients concatenated along channels, the
  concatenation included.

Shapes: ResNet-20's three stages (3x3 convolutions, 16, 32 and 64 channels at 28, 14 and 7
pixels) at batch 2, 8 and 32, and a ResNet-50 3x3 convolution (64 channels at 56 pixels) at
batch 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.train_step import median_microseconds, rounded, run_section

FORMS = ("producer", "separate", "stacked")
RESNET20_STAGES = ((16, 28), (32, 14), (64, 7))


def weight_gradient(grad_output: torch.Tensor, x: torch.Tensor, weight_shape: list[int]) -> torch.Tensor:
    weight = x.new_zeros(()).expand(weight_shape)
    return torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


def case(batch: int, channels: int, size: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen)
    g = torch.randn(batch, channels, size, size, generator=gen)
    y = torch.randn(batch, channels, size, size, generator=gen)
    centred = y - y.mean((0, 2, 3), keepdim=True)
    shape = [channels, channels, 3, 3]
    stacked_shape = [2 * channels, channels, 3, 3]
    return {
        "shape": f"{batch}x{channels}x{size}x{size}",
        "forms": {
            "producer": lambda: weight_gradient(g, x, shape),
            "separate": lambda: (weight_gradient(g, x, shape), weight_gradient(centred, x, shape)),
            "stacked": lambda: weight_gradient(torch.cat((g, centred), 1), x, stacked_shape),
        },
    }


def measure(args, log) -> list[dict]:
    cases = [case(batch, channels, size) for batch in args.batch_sizes for channels, size in RESNET20_STAGES]
    cases.append(case(2, 64, 56))
    rows = []
    with torch.no_grad():
        for c in cases:
            medians = median_microseconds(c["forms"], args.rounds)
            row = {"shape": c["shape"], "rounds": args.rounds, **{f"{form}_us": medians[form] for form in FORMS}}
            row["stacked_over_separate"] = row["stacked_us"] / row["separate_us"]
            rows.append(row)
            log(f"{row['shape']}: " + ", ".join(f"{form} {row[f'{form}_us']:.0f} us" for form in FORMS))
    return rows


def markdown(rows: list[dict], command: str, machine: dict) -> str:
    lines = [
        "### The statistic rows stacked onto the producer's weight gradient",
        "",
        f"`{command}` (commit {machine.get('git_commit')}, {machine.get('threads')} thread(s), load "
        f"average at start {rounded(machine['load_average_start'])}). `aten.convolution_backward`, weight "
        "only, 3x3 convolution with C in and out channels; medians of the forms interleaved "
        "round-robin. The extra columns are the cost above the producer's own weight gradient.",
        "",
        "| input (N x C x H x W) | producer's own | separate (floor) | stacked, 2C rows | extra, separate "
        "| extra, stacked | stacked / separate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['producer_us']:.0f} us | {r['separate_us']:.0f} us | {r['stacked_us']:.0f} us "
            f"| {r['separate_us'] - r['producer_us']:.0f} us | {r['stacked_us'] - r['producer_us']:.0f} us "
            f"| {r['stacked_over_separate']:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stacked_weight_gradient",
                                description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--md", type=Path, default=None, help="write the section into this markdown file")
    return p.parse_args(argv)


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows, _ = run_section("stacked_weight_gradient", "stacked-weight-gradient", args, argv, measure, markdown)
    return rows


if __name__ == "__main__":
    run()
