"""Where a compiled CBN step spends its time: inductor's generated kernels against the
``aten.convolution_backward`` calls, compiled BatchNorm beside it.

Run from the repository root::

    PYTHONPATH=src:. python -m benchmarks.compiled_kernels --md docs/performance.md

A small stack of convolution + norm + ReLU blocks (16 channels at 28x28, so each variant
compiles in seconds, not minutes as ResNet-20 does) is compiled with inductor and kernel
profiling on (``torch._inductor.config.cpp.enable_kernel_profile``), timed round-robin with the
same models run eagerly, then profiled: per training step, the self time of the generated C++
kernels and of the ``convolution_backward`` calls (the producers' own and, for CBN, the
statistic gradients).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from benchmarks.compiled_step import add_traced_layout_argument, statistic_gradient_layout
from benchmarks.train_step import Trainer, interleave, rounded, run_section

LABELS = {"bn": "BatchNorm", "naive": "naive CBN", "cbn": "CBN"}


def conv_stack(variant: str, blocks: int, window: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers, channels = [], 1
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        channels = 16
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    if variant == "bn":
        return model
    import cbn

    return cbn.convert_model(model, window=window, compensate=variant == "cbn", differentiable_compensation=False)


def trainer(variant: str, batch: int, args, compiled: bool) -> Trainer:
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    target = torch.randint(0, 10, (batch,), generator=gen)
    model = conv_stack(variant, args.blocks, args.window, args.seed)
    if compiled:
        model.train()(x)  # the eager forward that pairs the layers
        model = torch.compile(model, backend=args.backend, fullgraph=True)
    result = Trainer(model, x, target)
    for _ in range(args.window + 2):
        result.step()
    return result


def kernel_times(trainer: Trainer, steps: int) -> dict:
    """Self CPU time per step (us) of inductor's kernels and of ``convolution_backward``."""
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            trainer.step()
    kernels, convolution_backward, top = 0.0, 0.0, []
    for event in prof.key_averages():
        per_step = event.self_cpu_time_total / steps
        if event.key.startswith("graph_") and "cpp_fused" in event.key:
            kernels += per_step
            top.append((per_step, event.key))
        elif event.key == "aten::convolution_backward":
            convolution_backward += per_step
    top.sort(reverse=True)
    return {"kernels_us": kernels, "convolution_backward_us": convolution_backward,
            "top_kernels": [{"us": us, "name": name[:120]} for us, name in top[:3]]}


def measure(args, log) -> list[dict]:
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True
    rows = []
    for batch in args.batch_sizes:
        trainers = {(variant, compiled): trainer(variant, batch, args, compiled)
                    for variant in args.variants for compiled in (True, False)}
        times = interleave({key: t.step for key, t in trainers.items()}, args.steps)
        ms = {key: 1e3 * statistics.median(samples) for key, samples in times.items()}
        for variant in args.variants:
            rows.append({"batch": batch, "variant": variant, "ms": ms[variant, True], "eager_ms": ms[variant, False],
                         **kernel_times(trainers[variant, True], args.profile_steps)})
            log(f"batch {batch}, {variant}: compiled {ms[variant, True]:.2f} ms, eager {ms[variant, False]:.2f} ms, "
                f"kernels {rows[-1]['kernels_us']:.0f} us, "
                f"convolution_backward {rows[-1]['convolution_backward_us']:.0f} us per compiled step")
    return rows


def markdown(rows: list[dict], args, command: str, machine: dict) -> str:
    lines = [
        "### Compiled step by kernel (small conv stack)",
        "",
        f"`{command}` (commit {machine.get('git_commit')}, {machine.get('threads')} thread(s), load "
        f"average at start {rounded(machine['load_average_start'])}). {args.blocks} blocks of conv 3x3 "
        f"(16 channels) + norm + ReLU at 28x28, window {args.window}, SGD, inductor; steps: medians of "
        f"{args.steps} rounds interleaving the compiled and the eager models; self CPU time per compiled "
        f"step from `torch.profiler` over {args.profile_steps} steps, with inductor's kernel profiling on. "
        "The floor is compiled BatchNorm plus the time compiled CBN spends in `convolution_backward` "
        "beyond BatchNorm's (the statistic-gradient convolutions).",
        "",
        "| batch | method | compiled step | x compiled BN | eager step | x eager BN | generated kernels "
        "| convolution_backward calls |",
        "|---|---|---|---|---|---|---|---|",
    ]
    largest_kernels = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        group = [r for r in rows if r["batch"] == batch]
        bn = next(r for r in group if r["variant"] == "bn")
        for r in group:
            lines.append(f"| {batch} | {LABELS[r['variant']]} | {r['ms']:.2f} ms | {r['ms'] / bn['ms']:.2f}x | "
                         f"{r['eager_ms']:.2f} ms | {r['eager_ms'] / bn['eager_ms']:.2f}x | "
                         f"{r['kernels_us']:.0f} us | {r['convolution_backward_us']:.0f} us |")
        cbn_row = next((r for r in group if r["variant"] == "cbn"), None)
        if cbn_row is not None:
            floor = bn["ms"] + (cbn_row["convolution_backward_us"] - bn["convolution_backward_us"]) / 1e3
            lines.append(f"| {batch} | floor (compiled BN + CBN's extra convolutions) | {floor:.2f} ms "
                         f"| {floor / bn['ms']:.2f}x | | | | |")
            largest_kernels += ["", f"Largest generated kernels of compiled CBN at batch {batch}, per step:", ""]
            largest_kernels += [f"- {k['us']:.0f} us: `{k['name']}`" for k in cbn_row["top_kernels"]]
    return "\n".join(lines + largest_kernels) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 32])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--variants", nargs="+", choices=tuple(LABELS), default=list(LABELS))
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="inductor", help="aot_eager (no C++ build, no kernels) for a smoke run")
    p.add_argument("--md", type=Path, default=None, help="write the section into this markdown file")
    add_traced_layout_argument(p)
    return p.parse_args(argv)


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    if "bn" not in args.variants:
        args.variants = ["bn", *args.variants]
    with statistic_gradient_layout(args.traced_layout):
        rows, _ = run_section("compiled_kernels", "compiled-kernels", args, argv, measure,
                              lambda rows, command, machine: markdown(rows, args, command, machine))
    return rows


if __name__ == "__main__":
    run()
