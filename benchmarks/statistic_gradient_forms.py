"""The statistic gradients of one convolution: the kernels' direct loops against ATen's weight gradient.

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m benchmarks.statistic_gradient_forms
    PYTHONPATH=src:. python -m benchmarks.statistic_gradient_forms --shapes 2:16:16:28:3:1 --rounds 3

For each shape ``batch:in_channels:out_channels:size:kernel:stride`` (a square input, padding
``kernel // 2``), the mean patch and variance rows of one plain convolution
(:func:`cbn.functional.statistic_gradients.producer_statistic_gradients_of_layers`) with the C++
kernels, which take their direct loops where ``csrc/statistic_gradients.cpp`` says (at most 64
input channels, two or more kernel taps, float32, below batch 8) and ATen's weight gradient
elsewhere, against the Python form, which always takes ATen's. The two alternate round by round
in one process; medians. The default shapes are ResNet-20's 3x3 layers, the first stages of
resnet18 and resnet50 at 160 and 128 px, and their 1x1 and wider layers, where the kernels keep
ATen's form (their ratio is then about 1: the Python form's call costs a few microseconds more).

``--resnet20 BATCH`` times instead the kernel's one call over all of ResNet-20's convolutions
(``benchmarks.train_step``'s model, the activations of one forward at that batch), as the record
of a training step makes it: each layer's operands evicted by the others'. To compare two
versions of the library, copy this file into a ``git worktree`` of the other and run both,
alternately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit
from pathlib import Path

import torch
from torch import nn

from benchmarks.train_step import command_line, machine_info

DEFAULT_SHAPES = (
    "1:16:16:28:3:1", "2:16:16:28:3:1", "2:32:32:14:3:1", "1:64:64:7:3:1", "2:64:64:7:3:1",
    "2:16:32:28:3:2", "2:64:64:40:3:1", "2:64:64:32:3:1", "2:128:128:20:3:1", "2:256:256:10:3:1",
    "2:64:256:32:1:1", "2:256:64:32:1:1",
)


def measure(shape: str, rounds: int) -> dict:
    """Median seconds per call of both forms for one ``batch:in:out:size:kernel:stride`` shape."""
    import cbn.kernels
    from cbn.functional.statistic_gradients import producer_statistic_gradients_of_layers

    batch, in_channels, out_channels, size, kernel, stride = (int(v) for v in shape.split(":"))
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
    x = torch.randn(batch, in_channels, size, size)
    with torch.no_grad():
        y = conv(x)
    operands = [(conv, x, y, y.mean((0, 2, 3)))]

    def kernels():
        return producer_statistic_gradients_of_layers(operands)

    def aten():
        with cbn.kernels.use_kernels(False):
            return producer_statistic_gradients_of_layers(operands)

    kernels(), aten()
    calls = max(1, int(2e4 / max(1, batch * size * size * in_channels * kernel * kernel / 144)))
    times: dict[str, list[float]] = {"kernels": [], "aten": []}
    for _ in range(rounds):
        for name, fn in (("kernels", kernels), ("aten", aten)):
            times[name].append(timeit.timeit(fn, number=calls) / calls)
    kernels_us, aten_us = (1e6 * statistics.median(times[name]) for name in ("kernels", "aten"))
    return {"shape": shape, "kernels_us": kernels_us, "aten_us": aten_us, "ratio": kernels_us / aten_us,
            "calls_per_round": calls, "rounds": rounds}


def measure_resnet20(batch: int, rounds: int) -> dict:
    """Median seconds of one ``cbn::convolution_statistic_gradients`` call over ResNet-20's convolutions."""
    from benchmarks.train_step import _data, resnet20

    torch.manual_seed(0)
    model = resnet20()
    operands = []

    def keep(module, args, output):
        output = output.detach()
        operands.append((module, args[0].detach(), output, output.mean((0, 2, 3))))

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(_data(batch, 0)[0])
    for handle in handles:
        handle.remove()
    settings = [v for conv, *_ in operands for v in (*conv.stride, *conv.padding, *conv.dilation)]

    def call():
        return torch.ops.cbn.convolution_statistic_gradients(
            [o[1] for o in operands], [o[2] for o in operands], [o[3] for o in operands],
            [o[0].weight for o in operands], settings)

    call()
    times = []
    for _ in range(rounds):
        start = timeit.default_timer()
        call()
        times.append(timeit.default_timer() - start)
    return {"shape": f"resnet20 batch {batch} ({len(operands)} convolutions)",
            "kernels_us": 1e6 * statistics.median(times), "rounds": rounds}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="batch:in_channels:out_channels:size:kernel:stride")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--resnet20", type=int, default=None, metavar="BATCH",
                        help="time the kernel's one call over ResNet-20's convolutions at this batch instead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import cbn.kernels

    if not cbn.kernels.available():
        raise SystemExit("the C++ kernels are not available: nothing to compare")
    if args.resnet20 is not None:
        row = measure_resnet20(args.resnet20, max(args.rounds, 1))
        print(f"{row['shape']}: {row['kernels_us']:.1f} us (median of {row['rounds']})")
        return [row]
    rows = []
    for index, shape in enumerate(args.shapes, 1):
        row = measure(shape, args.rounds)
        rows.append(row)
        print(f"[{index}/{len(args.shapes)}] {shape}: kernels {row['kernels_us']:.1f} us, "
              f"ATen form {row['aten_us']:.1f} us, ratio {row['ratio']:.2f}", file=sys.stderr)
    print("| batch:in:out:size:kernel:stride | kernels (us) | ATen form (us) | kernels / ATen |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['kernels_us']:.1f} | {row['aten_us']:.1f} | {row['ratio']:.2f} |")
    if args.json is not None:
        command = command_line("statistic_gradient_forms", sys.argv[1:] if argv is None else argv)
        args.json.write_text(json.dumps({"command": command, "machine": machine_info(1), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
