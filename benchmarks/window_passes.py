"""The passes over a backbone's CBN windows and weights, alone: their time and the bandwidth they reach.

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m benchmarks.window_passes --models resnet18 resnet50
    PYTHONPATH=src:. python -m benchmarks.window_passes --smoke         # seconds, a few layers

On a large backbone a compensated step's extra over the weight-gradient floor is mostly two
memory-bound passes over the window of every paired convolution (``window - 1`` slots of the
statistic gradients, each as large as the weight) and one over the weights:

- ``shifts``: the Taylor step's first-order terms of every entry, ``cbn::statistic_shifts_many``
  (both rules, before the forward): reads the slots and the weights;
- ``backward``: the producer's gradient of differentiable compensation,
  ``cbn::compensation_gradients`` (the default only, in the backward): reads the slots, writes a
  weight-sized gradient;
- ``fingerprint``: the producer fingerprint pairing takes at every call, ``cbn::weight_fingerprint``
  (both rules, in the forward): reads the weights and biases.

Windows of the shapes the layers of a timm model give (one per convolution, its groups kept),
filled with random values; each pass timed over every layer after a write to a buffer larger
than the caches (as in a step, where the convolutions evicted the window). Reported: the median
over ``--repeats`` of each pass and its quartiles, the bytes it moves at least, and the bandwidth
that makes, beside the read bandwidth of one thread over a large buffer
(``benchmarks.backbone_step.read_bandwidth``).
Only the C++ kernels are timed (:mod:`cbn.kernels`). To compare two versions of the library, run
this in a ``git worktree`` of each, alternately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.backbone_step import quartiles, read_bandwidth
from benchmarks.train_step import command_line, machine_info


def window_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(groups, C, fan_in)`` of every convolution's window slots."""
    return [(m.groups, m.out_channels, m.weight[0].numel()) for m in model.modules() if isinstance(m, nn.Conv2d)]


def make_windows(shapes, entries: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def random(*size):
        return torch.randn(*size, generator=generator)

    return [dict(mean_slots=[random(groups, fan_in) for _ in range(entries)],
                 var_slots=[random(channels, fan_in) for _ in range(entries)],
                 weight=random(channels, fan_in), bias=random(channels),
                 coefficients=random(channels, 3, entries), grad_center=random(channels),
                 grad_spread=random(channels))
            for groups, channels, fan_in in shapes]


def passes(windows: list[dict]) -> dict:
    """The three passes as functions over every layer, and the bytes each moves at least."""
    from cbn.producer_call import _probe_parts

    ops = torch.ops.cbn
    mean_slots = [t for w in windows for t in w["mean_slots"]]
    var_slots = [t for w in windows for t in w["var_slots"]]
    entries = len(windows[0]["var_slots"])  # (every layer's window has as many slots)
    weights, biases = [w["weight"] for w in windows], [w["bias"] for w in windows]

    def shifts():
        ops.statistic_shifts_many(mean_slots, var_slots, entries, weights, biases)

    def backward():
        for w in windows:
            ops.compensation_gradients(w["coefficients"], w["grad_center"], w["grad_spread"], w["mean_slots"],
                                       w["var_slots"], list(w["weight"].shape))

    probe = _probe_parts(torch.float32, torch.device("cpu"))

    def fingerprint():
        for weight, bias in zip(weights, biases):
            ops.weight_fingerprint([weight, bias], *probe)

    slot_bytes = sum(t.numel() * t.element_size() for t in (*mean_slots, *var_slots))
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    bias_bytes = sum(b.numel() * b.element_size() for b in biases)
    # shifts: the slots and the weights read; backward: the slots read, a weight-sized gradient
    # written; fingerprint: the weights and biases read.
    return {"shifts": (shifts, slot_bytes + weight_bytes), "backward": (backward, slot_bytes + weight_bytes),
            "fingerprint": (fingerprint, weight_bytes + bias_bytes)}


def measure(model_name: str, entries: int, repeats: int, layers: int | None) -> list[dict]:
    import timm

    shapes = window_shapes(timm.create_model(model_name))[:layers]
    timed = passes(make_windows(shapes, entries))
    evict = torch.empty(64 * 2**20 // 4)
    times = {name: [] for name in timed}
    for _ in range(repeats):
        for name, (run, _) in timed.items():  # alternated, each after the caches were flushed
            evict.add_(1.0)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (_, nbytes) in timed.items():
        median = statistics.median(times[name])
        q1, q3 = quartiles(times[name])
        rows.append(dict(model=model_name, layers=len(shapes), entries=entries, pass_=name, ms=median * 1e3,
                         q1_ms=q1 * 1e3, q3_ms=q3 * 1e3, bytes=nbytes, bandwidth=nbytes / median))
    return rows


def markdown(rows: list[dict], bandwidth: float, command: str, machine: dict) -> str:
    lines = [
        f"Command: `{command}` (commit {machine['git_commit']}, {machine['cpu']}, 1 thread; one thread reads "
        f"{bandwidth / 1e9:.1f} GB/s from a large buffer)",
        "",
        "| model | layers | pass | median (quartiles) | bytes at least | bandwidth reached |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['layers']} | {row['pass_']} | {row['ms']:.2f} ms "
                     f"({row['q1_ms']:.2f}-{row['q3_ms']:.2f}) | {row['bytes'] / 1e6:.0f} MB | "
                     f"{row['bandwidth'] / 1e9:.1f} GB/s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "efficientnet_b0"])
    parser.add_argument("--window", type=int, default=4, help="entries pooled (window - 1 slots)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="the first 3 layers, 3 repeats")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import cbn.kernels

    if not cbn.kernels.active():
        raise SystemExit("benchmarks.window_passes times the C++ kernels, which did not load")
    torch.set_num_threads(1)
    repeats, layers = (3, 3) if args.smoke else (args.repeats, None)
    rows = []
    for name in args.models:
        print(f"{name}: {repeats} repeats of each pass", file=sys.stderr, flush=True)
        rows += measure(name, args.window - 1, repeats, layers)
    bandwidth = read_bandwidth(64 if args.smoke else 256)
    machine = machine_info(1)
    command = command_line("window_passes", sys.argv[1:] if argv is None else argv)
    print(markdown(rows, bandwidth, command, machine))
    if args.json is not None:
        args.json.write_text(json.dumps(dict(command=command, machine=machine, read_bandwidth=bandwidth,
                                             rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
