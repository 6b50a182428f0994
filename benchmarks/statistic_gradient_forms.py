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

Beside them, the floor's one weight-gradient convolution of the output itself (C rows, no centring,
no mean patch), the least a compensated step pays per layer. ``--backbone MODEL:SIZE:BATCH`` times
instead the kernels against that floor layer by layer over a timm model's plain convolutions (e.g.
``resnet18:160:2``), the sums of their medians.

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


def _forms(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The three forms for one convolution's output ``y`` of input ``x``: the kernels, the Python
    (ATen) form, and the floor's one weight-gradient convolution of the output itself (C rows, no
    centring, no mean patch: what ``benchmarks.train_step.WeightGradFloor`` pays)."""
    import cbn.kernels
    from cbn.functional.statistic_gradients import producer_statistic_gradients_of_layers

    operands = [(conv, x, y, y.mean((0, 2, 3)))]
    placeholder = torch.empty_like(conv.weight)

    def kernels():
        return producer_statistic_gradients_of_layers(operands)

    def aten():
        with cbn.kernels.use_kernels(False):
            return producer_statistic_gradients_of_layers(operands)

    def floor():
        return torch.ops.aten.convolution_backward(y, x, placeholder, None, conv.stride, conv.padding, conv.dilation,
                                                   False, [0, 0], conv.groups, [False, True, False])

    return {"kernels": kernels, "aten": aten, "floor": floor}


def _medians(forms: dict, rounds: int, calls: int) -> dict:
    """Median seconds per call of each form, the forms alternated round by round."""
    for fn in forms.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, fn in forms.items():
            times[name].append(timeit.timeit(fn, number=calls) / calls)
    return {name: statistics.median(samples) for name, samples in times.items()}


def measure(shape: str, rounds: int) -> dict:
    """Median seconds per call of the forms for one ``batch:in:out:size:kernel:stride`` shape."""
    batch, in_channels, out_channels, size, kernel, stride = (int(v) for v in shape.split(":"))
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
    x = torch.randn(batch, in_channels, size, size)
    with torch.no_grad():
        y = conv(x)
    calls = max(1, int(2e4 / max(1, batch * size * size * in_channels * kernel * kernel / 144)))
    medians = _medians(_forms(conv, x, y), rounds, calls)
    kernels_us, aten_us, floor_us = (1e6 * medians[name] for name in ("kernels", "aten", "floor"))
    return {"shape": shape, "kernels_us": kernels_us, "aten_us": aten_us, "floor_us": floor_us,
            "ratio": kernels_us / aten_us, "floor_ratio": kernels_us / floor_us, "calls_per_round": calls,
            "rounds": rounds}


def measure_backbone(cell: str, rounds: int) -> dict:
    """The kernels against the floor's convolution, layer by layer, over a timm model's plain 2-D
    convolutions (``groups == 1``) at ``model:size:batch``: each layer's medians, summed."""
    import timm

    name, size, batch = cell.split(":")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()  # (the shapes are what count)
    layers = []

    def keep(module, args, output):
        layers.append((module, args[0].detach(), output.detach()))

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    with torch.no_grad():
        model(torch.randn(int(batch), 3, int(size), int(size)))
    for handle in handles:
        handle.remove()
    totals = {"kernels": 0.0, "floor": 0.0}
    for conv, x, y in layers:
        forms = _forms(conv, x, y)
        medians = _medians({key: forms[key] for key in totals}, rounds, 1)
        for key in totals:
            totals[key] += medians[key]
    return {"shape": f"{cell} ({len(layers)} convolutions)", "kernels_us": 1e6 * totals["kernels"],
            "floor_us": 1e6 * totals["floor"], "floor_ratio": totals["kernels"] / totals["floor"], "rounds": rounds}


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
    parser.add_argument("--backbone", default=None, metavar="MODEL:SIZE:BATCH",
                        help="time instead the kernels against the floor's convolution over a timm model's layers")
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
    if args.backbone is not None:
        rows = [measure_backbone(args.backbone, max(args.rounds, 1))]
        print(f"{rows[0]['shape']}: kernels {rows[0]['kernels_us'] / 1e3:.2f} ms, floor's convolutions "
              f"{rows[0]['floor_us'] / 1e3:.2f} ms, {rows[0]['floor_ratio']:.2f}x")
    else:
        rows = []
        for index, shape in enumerate(args.shapes, 1):
            row = measure(shape, args.rounds)
            rows.append(row)
            print(f"[{index}/{len(args.shapes)}] {shape}: kernels {row['kernels_us']:.1f} us, "
                  f"ATen form {row['aten_us']:.1f} us, floor {row['floor_us']:.1f} us", file=sys.stderr)
        print("| batch:in:out:size:kernel:stride | kernels (us) | ATen form (us) | floor's convolution (us) "
              "| kernels / ATen | kernels / floor |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['shape']} | {row['kernels_us']:.1f} | {row['aten_us']:.1f} | {row['floor_us']:.1f} "
                  f"| {row['ratio']:.2f} | {row['floor_ratio']:.2f} |")
    if args.json is not None:
        command = command_line("statistic_gradient_forms", sys.argv[1:] if argv is None else argv)
        args.json.write_text(json.dumps({"command": command, "machine": machine_info(1), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
