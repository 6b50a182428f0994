"""CBN's training-step cost at a realistic size: a bottleneck ResNet-50 on 3x224x224 images at
batch 1 and 2, where CBN is really used, against BatchNorm and naive CBN.

Run from the repository root::

    PYTHONPATH=src:. python -m benchmarks.resnet50_step --md docs/performance.md

The model is the standard bottleneck layout (stages of 3, 4, 6 and 3 blocks, widths 64 to 512,
expansion 4, 53 BatchNorm layers), written here because torchvision does not import with the
pinned torch. Variants are built from the same seed, warmed up until the windows are full, and
timed round-robin in one process; medians and ratios to BatchNorm of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.train_step import add_floor, interleave, rounded, run_section


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, channels = [], 64
        for index, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(channels, width, 2 if index > 0 and block == 0 else 1))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(F.adaptive_avg_pool2d(self.stages(x), 1).flatten(1))


def build(variant: str, window: int, seed: int) -> nn.Module:
    import cbn

    torch.manual_seed(seed)
    model = ResNet50()
    if variant == "bn":
        return model
    if variant == "floor":  # BatchNorm plus one weight-gradient convolution per normalized conv
        return add_floor(model)
    return cbn.convert_model(model, window=window, compensate=variant == "cbn", differentiable_compensation=False)


class Trainer:
    def __init__(self, model: nn.Module, batch: int, seed: int, size: int = 224) -> None:
        generator = torch.Generator().manual_seed(seed + batch)
        self.x = torch.randn(batch, 3, size, size, generator=generator)
        self.target = torch.randint(0, 1000, (batch,), generator=generator)
        self.model = model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.target).backward()
        self.optimizer.step()


def measure(args, log) -> list[dict]:
    rows = []
    for batch in args.batch_sizes:
        trainers = {v: Trainer(build(v, args.window, args.seed), batch, args.seed, args.image_size)
                    for v in args.variants}
        for trainer in trainers.values():
            for _ in range(args.window + 1):
                trainer.step()
        times = interleave({v: t.step for v, t in trainers.items()}, args.steps)
        base = statistics.median(times["bn"])
        for variant, samples in times.items():
            rows.append({"variant": variant, "batch": batch, "window": args.window,
                         "step_ms": 1e3 * statistics.median(samples), "ratio": statistics.median(samples) / base,
                         "min_ms": 1e3 * min(samples), "max_ms": 1e3 * max(samples), "rounds": len(samples)})
        log(f"batch {batch}: " + ", ".join(f"{r['variant']} {r['step_ms']:.0f} ms ({r['ratio']:.2f}x)"
                                           for r in rows[-len(trainers):]))
    return rows


def markdown(rows: list[dict], command: str, machine: dict) -> str:
    lines = [
        f"### ResNet-50 at 3x{machine['image_size']}x{machine['image_size']}, batch "
        + " and ".join(str(b) for b in sorted({r["batch"] for r in rows})),
        "",
        f"`{command}` (commit {machine.get('git_commit')}, {machine.get('threads')} thread(s), "
        f"load average at start {rounded(machine['load_average_start'])}). Bottleneck ResNet-50 (53 norm layers), "
        "window 4, SGD; median of interleaved rounds (min to max in brackets), ratio to BatchNorm.",
        "",
        "| batch | BatchNorm | floor (BN + 1 wgrad conv) | naive CBN | CBN |",
        "|---|---|---|---|---|",
    ]
    for batch in sorted({r["batch"] for r in rows}):
        cells = {r["variant"]: r for r in rows if r["batch"] == batch}
        lines.append(f"| {batch} | " + " | ".join(
            f"{c['step_ms']:.0f} ms ({c['ratio']:.2f}x; {c['min_ms']:.0f} to {c['max_ms']:.0f})"
            if (c := cells.get(v)) else "-" for v in ("bn", "floor", "naive", "cbn")) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resnet50_step", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", choices=("bn", "floor", "naive", "cbn"),
                   default=["bn", "floor", "naive", "cbn"])
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed round-robin rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--md", type=Path, default=None, help="write the section into this markdown file")
    return p.parse_args(argv)


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows, context = run_section(
        "resnet50_step", "resnet50", args, argv, measure,
        lambda rows, command, machine: markdown(rows, command, {**machine, "image_size": args.image_size}),
    )
    print(f"{context['wall_s']:.0f} s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run()
