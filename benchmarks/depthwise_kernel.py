"""The variance gradients of depthwise producers: ``cbn::depthwise_variance_gradients`` against
ATen's form, at the depthwise layers of timm's EfficientNet-B0 (160x160 input, batch 2).

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m benchmarks.depthwise_kernel [--json out.json]

ATen's form is what :func:`cbn.functional.producer_statistic_gradients` runs without the kernels:
the weight gradient of one depthwise convolution (``convolution_backward``) of ``(y - mu) 2/m``.
Both are timed round-robin, medians of ``--rounds`` calls, and checked against each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.train_step import machine_info, median_microseconds

# (channels, input height = width, kernel, stride) of EfficientNet-B0's depthwise convolutions at
# 160x160 (each distinct shape once).
SHAPES = ((32, 80, 3, 1), (96, 80, 3, 2), (144, 40, 3, 1), (144, 40, 5, 2), (240, 20, 5, 1), (240, 20, 3, 2),
          (480, 10, 3, 1), (480, 10, 5, 1), (672, 10, 5, 1), (672, 10, 5, 2), (1152, 5, 5, 1))


def case(channels: int, size: int, kernel: int, stride: int, batch: int, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    weight = torch.randn(channels, 1, kernel, kernel, generator=generator)
    padding = kernel // 2
    y = F.conv2d(x, weight, stride=stride, padding=padding, groups=channels)
    mean = y.mean((0, 2, 3))
    scale = 2.0 / (y.numel() // channels)

    def kernel_form():
        return torch.ops.cbn.depthwise_variance_gradients(x, y, mean, [kernel] * 2, [stride] * 2, [padding] * 2, [1, 1])

    def aten_form():
        centred = (y - mean.view(1, -1, 1, 1)) * scale
        return torch.ops.aten.convolution_backward(centred, x, weight, None, [stride] * 2, [padding] * 2, [1, 1],
                                                   False, [0, 0], channels, [False, True, False])[1]

    reference = aten_form().view(channels, kernel, kernel)
    difference = (kernel_form() - reference).abs().max()
    times = median_microseconds({"kernel": kernel_form, "aten": aten_form}, rounds)
    return {"channels": channels, "size": size, "kernel": kernel, "stride": stride, "batch": batch,
            "kernel_us": times["kernel"], "aten_us": times["aten"], "max_abs_difference": float(difference),
            "max_abs_value": float(reference.abs().max())}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.depthwise_kernel", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import cbn.kernels

    if not cbn.kernels.available():
        raise SystemExit("cbn's C++ kernels are not available: nothing to compare")
    rows = [case(*shape, args.batch, args.rounds) for shape in SHAPES]
    print("| channels, input, kernel, stride | kernel | ATen's form |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['channels']}, {row['size']}x{row['size']}, {row['kernel']}x{row['kernel']}, {row['stride']} | "
              f"{row['kernel_us']:.0f} us | {row['aten_us']:.0f} us |")
    total_kernel, total_aten = sum(r["kernel_us"] for r in rows), sum(r["aten_us"] for r in rows)
    print(f"| all | {total_kernel / 1e3:.2f} ms | {total_aten / 1e3:.2f} ms |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(torch.get_num_threads()), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
