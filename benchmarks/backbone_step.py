"""Training-step cost of CBN on real backbones, where users train: timm ResNet-18, ResNet-50,
EfficientNet-B0 and the Faster R-CNN + FPN of ``examples/detector.py``, at 1, 2 and 8 images.

Run from the repository root (about 25 minutes on one core for the default grid)::

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m benchmarks.backbone_step --md docs/performance.md
    PYTHONPATH=src:. python -m benchmarks.backbone_step --smoke       # seconds, tiny sizes

Per model, input size and batch size, the variants are built from the same seed, trained until
every window is full, then timed round-robin (the order rotates every round) in one process:

- ``bn``: the model as timm / torchvision build it (``nn.BatchNorm2d`` or timm's ``BatchNormAct2d``);
- ``floor``: BatchNorm plus one weight-gradient convolution per normalized convolution, the least
  work a compensated CBN step can do (``benchmarks.train_step.WeightGradFloor``);
- ``traffic``: the floor plus the least window traffic of the default, moved by ATen's own
  reductions (``WindowTrafficFloor``): the memory bound below, measured as a step;
- ``naive``: ``cbn.convert_model(..., compensate=False)``;
- ``cbn``: the paper's rule (``differentiable_compensation=False``);
- ``cbn-diff``: the default (differentiable compensation).

A step is ``zero_grad`` + forward + loss + backward + SGD with momentum. Reported per cell: the
median step time, the spread over rounds (first to third quartile), the ratio to BatchNorm of the
same run; per variant and model (at batch 2, the smaller input), every ``aten::`` profiler event of
one step (nested ones included) and the bytes the CBN windows hold between steps (entries and
statistic gradients; the weights' bytes times ``window - 1`` is what the paper's method stores).

Memory bound (CPU): per cell, the read bandwidth of one thread over a buffer far larger than the
caches (``read_bandwidth``), and the bytes a compensated step must move at least through the
window (``window_traffic``): the paper's rule reads every past slot and the weights once for the
Taylor step and writes the new entry, (k + 1) |W|; the default also reads the past slots once in
the backward and writes the weight gradient, (2k + 1) |W| (|W|: the compensated producers' weight
values, k - 1 past slots). ``floor + traffic / bandwidth`` is the least step time a compensated
variant can reach on this machine, reported beside the measured one.

Writes a JSON with every figure and a markdown section.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.train_step import WeightGradFloor, add_floor, command_line, interleave, machine_info, write_section

VARIANTS = ("bn", "floor", "traffic", "naive", "cbn", "cbn-diff")
LABELS = {"bn": "BatchNorm", "floor": "floor", "traffic": "floor + window traffic", "naive": "naive CBN",
          "cbn": "paper's rule", "cbn-diff": "default (differentiable)"}
# (model, input sizes): two sizes each, the smaller one where 1-2 images per step are typical.
MODELS = {
    "resnet18": (64, 160),
    "resnet50": (96, 128),
    "efficientnet_b0": (128, 160),
    "detector": (128, 192),
}


def build(model_name: str, variant: str, window: int, seed: int) -> nn.Module:
    import cbn

    torch.manual_seed(seed)
    if model_name == "detector":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
        from detector import build_detector

        model = build_detector("bn")
    else:
        import timm

        model = timm.create_model(model_name, pretrained=False, num_classes=10)
    if variant == "bn":
        return model
    if variant == "floor":
        return add_floor(model)
    if variant == "traffic":
        return add_floor(model, lambda conv: WindowTrafficFloor(conv, window - 1))
    return cbn.convert_model(model, window=window, burnin=0, compensate=variant != "naive",
                             differentiable_compensation=variant == "cbn-diff")


class WindowTrafficFloor(WeightGradFloor):
    """The floor's convolution plus the least memory traffic of the default's window, moved by ATen.

    A compensated step cannot move fewer bytes through a window of ``slots`` past statistic
    gradients, each as large as the weight ``W``, than: before the normalization, every slot and
    the weight read once (the Taylor step's terms); the new entry written (the floor's buffer
    copy); in the backward, every slot read once more and a weight-sized gradient written (the
    default's producer gradient). Here a reduction over the slots and one over the weight do the
    reads, and a sum over the slots into a buffer, from a hook on the convolution's output, does
    the backward's read and write: streams at the bandwidth ATen's reductions reach, whatever the
    caches hold after them, with none of CBN's arithmetic.
    """

    def __init__(self, conv: nn.Conv2d, slots: int) -> None:
        super().__init__(conv)
        self.register_buffer("window_slots", torch.rand(slots, *conv.weight.shape), persistent=False)
        self.register_buffer("window_gradient", torch.zeros_like(conv.weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.window_slots.sum()
                self.conv.weight.sum()
        y = super().forward(x)
        if self.training and y.requires_grad:
            y.register_hook(self._backward_pass)
        return y

    def _backward_pass(self, grad: torch.Tensor) -> None:
        with torch.no_grad():
            torch.sum(self.window_slots, 0, out=self.window_gradient)

    def traffic_bytes(self) -> int:
        """The bytes this module moves through its window per training step, at least."""
        return (2 * self.window_slots.shape[0] + 3) * self.conv.weight.numel() * self.conv.weight.element_size()


class Step:
    """One SGD training step of a model on fixed data (images and targets built once)."""

    def __init__(self, model_name: str, model: nn.Module, batch: int, size: int, seed: int, device="cpu") -> None:
        generator = torch.Generator().manual_seed(seed + 1000 * batch + size)
        self.model = model.to(device).train()
        self.device = torch.device(device)
        self.detector = model_name == "detector"
        if self.detector:
            self.images = [torch.rand(1, size, size, generator=generator).to(device) for _ in range(batch)]
            self.targets = []
            for _ in range(batch):
                corner = torch.rand(3, 2, generator=generator) * (size * 0.6)
                extent = 12 + torch.rand(3, 2, generator=generator) * (size * 0.3)
                self.targets.append({"boxes": torch.cat((corner, corner + extent), 1).to(device),
                                     "labels": torch.randint(1, 11, (3,), generator=generator).to(device)})
        else:
            self.images = torch.randn(batch, 3, size, size, generator=generator).to(device)
            self.target = torch.randint(0, 10, (batch,), generator=generator).to(device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.detector:
            loss = sum(self.model(self.images, self.targets).values())
        else:
            loss = F.cross_entropy(self.model(self.images), self.target)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":  # the step's time, not its launch
            torch.cuda.synchronize(self.device)


def quartiles(samples: list[float]) -> tuple[float, float]:
    """First and third quartile (the extremes below four samples)."""
    if len(samples) < 4:
        return min(samples), max(samples)
    q = statistics.quantiles(samples, n=4)
    return q[0], q[2]


def profile_step(step: Step) -> dict:
    """aten ops of one step (every event, nested included) and the bytes CBN's windows hold."""
    from cbn import CrossIterationBatchNormBase

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    window_bytes = sum(m.window_state.nbytes() for m in step.model.modules()
                       if isinstance(m, CrossIterationBatchNormBase))
    return {"aten_ops": sum(e.name.startswith("aten::") for e in events),
            "cbn_ops": sum(e.name.startswith("cbn::") for e in events), "window_bytes": window_bytes}


def self_times(model_name: str, size: int, batch: int, args, top: int = 14) -> str:
    """Self CPU time per op and step (``torch.profiler``, 3 steps after 6) of each variant, as a
    markdown table: where a variant's extra time goes."""
    import collections

    totals = {}
    for variant in args.variants:
        step = Step(model_name, build(model_name, variant, args.window, args.seed), batch, size, args.seed, args.device)
        for _ in range(6):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        totals[variant] = collections.Counter({e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()})
    names = sorted({name for counts in totals.values() for name, _ in counts.most_common(top)},
                   key=lambda name: -max(counts[name] for counts in totals.values()))
    lines = [f"Self CPU ms per step, {model_name} at {size}x{size}, batch {batch}:", "",
             "| op | " + " | ".join(LABELS[v] for v in totals) + " |", "|---|" + "---|" * len(totals)]
    lines += [f"| `{name}` | " + " | ".join(f"{counts[name]:.1f}" for counts in totals.values()) + " |" for name in names]
    lines.append("| all | " + " | ".join(f"{sum(counts.values()):.1f}" for counts in totals.values()) + " |")
    return "\n".join(lines)


def read_bandwidth(mebibytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one thread reads from memory: the median over ``repeats`` sums of a
    buffer far larger than the caches (a fresh buffer, touched once before timing)."""
    buffer = torch.ones(mebibytes * 2**20 // 4)
    buffer.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / statistics.median(times)


def window_traffic(model: nn.Module, differentiable: bool) -> int:
    """The bytes one compensated training step must move through the window at least (module
    docstring): (past slots + 2) |W| for the paper's rule, (2 past slots + 3) |W| for the default,
    summed over every compensated call position."""
    from cbn import CrossIterationBatchNormBase

    total = 0
    for layer in model.modules():
        if not isinstance(layer, CrossIterationBatchNormBase):
            continue
        for position in layer.window_state.positions:
            gradients = position.var_grad
            if gradients is None:
                continue
            channels, slots, fan_in = gradients.shape
            passes = 2 * slots + 3 if differentiable else slots + 2
            total += passes * channels * fan_in * gradients.element_size()
    return total


def measure(args, log) -> list[dict]:
    rows = []
    cells = [(m, size, batch) for m in args.models for size in args.sizes_of(m) for batch in args.batch_sizes]
    start = time.perf_counter()
    for index, (model_name, size, batch) in enumerate(cells):
        base = build(model_name, "bn", args.window, args.seed)
        steps = {}
        for variant in args.variants:
            model = copy.deepcopy(base) if variant == "bn" else build(model_name, variant, args.window, args.seed)
            steps[variant] = Step(model_name, model, batch, size, args.seed, args.device)
        for step in steps.values():
            for _ in range(args.window + 1):  # every window full
                step()
        times = interleave(steps, args.rounds)
        reference = statistics.median(times["bn"]) if "bn" in times else None
        bandwidth = read_bandwidth() if args.device == "cpu" else None
        floor = statistics.median(times["floor"]) if "floor" in times else None
        profiled = {}
        if batch == args.profile_batch and size == args.sizes_of(model_name)[0]:
            profiled = {variant: profile_step(step) for variant, step in steps.items()}
        for variant, samples in times.items():
            median = statistics.median(samples)
            low, high = quartiles(samples)
            bound = {}
            if variant in ("cbn", "cbn-diff") and bandwidth and floor:
                traffic = window_traffic(steps[variant].model, variant == "cbn-diff")
                bound = {"traffic_bytes": traffic, "read_bandwidth": bandwidth,
                         "bound_ms": 1e3 * (floor + traffic / bandwidth)}
            elif variant == "traffic":
                bound = {"traffic_bytes": sum(m.traffic_bytes() for m in steps[variant].model.modules()
                                              if isinstance(m, WindowTrafficFloor))}
            rows.append({"model": model_name, "size": size, "batch": batch, "variant": variant,
                         "window": args.window, "step_ms": 1e3 * median, "q1_ms": 1e3 * low, "q3_ms": 1e3 * high,
                         "rounds": len(samples), "ratio": median / reference if reference else None,
                         **bound, **profiled.get(variant, {})})
        elapsed = time.perf_counter() - start
        left = elapsed / (index + 1) * (len(cells) - index - 1)
        log(f"[{index + 1}/{len(cells)}] {model_name} {size}px batch {batch}: "
            + ", ".join(f"{r['variant']} {r['step_ms']:.0f} ms" + (f" ({r['ratio']:.2f}x)" if r["ratio"] else "")
                        for r in rows[-len(times):])
            + f"  [{elapsed:.0f}s, about {left:.0f}s left]")
    return rows


def markdown(rows: list[dict], command: str, machine: dict) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lines = [
        "### Real backbones (issue 29)",
        "",
        f"`{command}` (commit {machine.get('git_commit')}, {machine.get('device')}, {machine.get('threads')} thread(s), torch "
        f"{torch.__version__}, load average at start {tuple(round(x, 2) for x in machine['load_average_start'])}). "
        "Window 4, SGD with momentum, windows full; median step time of interleaved rounds (first to third "
        "quartile in brackets), ratio to BatchNorm of the same run.",
        "",
        "| model | input | batch | " + " | ".join(LABELS[v] for v in variants) + " | default / paper |",
        "|---|---|---|" + "---|" * (len(variants) + 1),
    ]
    keys = list(dict.fromkeys((r["model"], r["size"], r["batch"]) for r in rows))
    for key in keys:
        cells = {r["variant"]: r for r in rows if (r["model"], r["size"], r["batch"]) == key}
        text = []
        for v in variants:
            c = cells.get(v)
            if c is None:
                text.append("-")
            elif v == "bn":
                text.append(f"{c['step_ms']:.0f} ms ({c['q1_ms']:.0f}-{c['q3_ms']:.0f})")
            else:
                text.append(f"{c['ratio']:.2f}x ({c['q1_ms']:.0f}-{c['q3_ms']:.0f} ms)")
        paper, default = cells.get("cbn"), cells.get("cbn-diff")
        ratio = f"{default['step_ms'] / paper['step_ms']:.2f}x" if paper and default else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(text) + f" | {ratio} |")
    bounded = [r for r in rows if "bound_ms" in r]
    if bounded:
        lines += ["", "Memory bound: the floor of the same run plus the bytes the variant must move through its "
                  "window per step (`window_traffic`) at the read bandwidth of one thread measured in the same "
                  "cell (`read_bandwidth`), and the same bytes moved by ATen's reductions inside a step "
                  "(`WindowTrafficFloor`, measured in the same rounds); ratios to BatchNorm:", "",
                  "| model | input | batch | read GB/s | window traffic, paper's rule / default | "
                  "paper's rule: bound, measured | default: bound, measured | floor + window traffic, measured |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in dict.fromkeys((r["model"], r["size"], r["batch"]) for r in bounded):
            cells = {r["variant"]: r for r in rows if (r["model"], r["size"], r["batch"]) == key}
            base = cells["bn"]["step_ms"] if "bn" in cells else None
            if base is None:
                continue
            any_cell = next(c for v, c in cells.items() if "bound_ms" in c)

            def pair(v):
                c = cells.get(v)
                return f"{c['bound_ms'] / base:.2f}x, {c['ratio']:.2f}x" if c and "bound_ms" in c else "-"

            traffic = " / ".join(f"{cells[v]['traffic_bytes'] / 2**20:.0f} MiB" if v in cells and "traffic_bytes" in cells[v]
                                 else "-" for v in ("cbn", "cbn-diff"))
            moved = cells.get("traffic")
            moved = f"{moved['ratio']:.2f}x ({moved['traffic_bytes'] / 2**20:.0f} MiB)" if moved else "-"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {any_cell['read_bandwidth'] / 1e9:.1f} | {traffic} | "
                         f"{pair('cbn')} | {pair('cbn-diff')} | {moved} |")
    profiled = [r for r in rows if "aten_ops" in r]
    if profiled:
        lines += ["", "ATen operations per training step (every `aten::` profiler event, nested ones included) "
                  "and MiB held by the CBN windows between steps, at the batch and input of the row:", "",
                  "| model | input | batch | " + " | ".join(LABELS[v] for v in variants) + " |",
                  "|---|---|---|" + "---|" * len(variants)]
        for key in dict.fromkeys((r["model"], r["size"], r["batch"]) for r in profiled):
            cells = {r["variant"]: r for r in profiled if (r["model"], r["size"], r["batch"]) == key}
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
                f"{c['aten_ops']} ops" + (f", {c['window_bytes'] / 2**20:.1f} MiB" if c['window_bytes'] else "") if (c := cells.get(v)) else "-"
                for v in variants) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backbone_step", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes (default: two per model)")
    p.add_argument("--cells", nargs="+", default=None, metavar="MODEL:SIZE",
                   help="only these model and input-size pairs, e.g. resnet50:128 (overrides --models, --sizes)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds per cell")
    p.add_argument("--profile-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (see benchmarks/gpu_check.sh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("docs/performance-ab/backbones.json"))
    p.add_argument("--md", type=Path, default=None, help="write the section into this markdown file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 2 rounds (seconds)")
    p.add_argument("--self-times", metavar="MODEL:SIZE:BATCH", default=None,
                   help="instead of timing: the self CPU time per op of each variant for one cell")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.sizes, args.batch_sizes, args.rounds = ["resnet18"], [32], [2], 2
        args.json = None
    args.sizes_of = (lambda model: args.sizes) if args.sizes else (lambda model: MODELS[model])
    if args.cells:
        pairs = [cell.split(":") for cell in args.cells]
        if any(len(pair) != 2 or pair[0] not in MODELS or not pair[1].isdigit() for pair in pairs):
            p.error(f"--cells takes MODEL:SIZE with MODEL in {list(MODELS)}, got {args.cells}")
        args.models = list(dict.fromkeys(model for model, _ in pairs))
        sizes = {model: [int(size) for m, size in pairs if m == model] for model in args.models}
        args.sizes_of = sizes.__getitem__
    return args


def run(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.self_times:
        model_name, size, batch = args.self_times.split(":")
        print(self_times(model_name, int(size), int(batch), args))
        return []
    machine = machine_info(args.threads)
    machine["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine["cpu"]
    command = command_line("backbone_step", sys.argv[1:] if argv is None else argv)
    rows = measure(args, lambda text: print(text, flush=True))
    text = markdown(rows, command, machine)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1) + "\n")
    if args.md is not None:
        write_section(args.md, "Real backbones (issue 29)", text)
    return rows


if __name__ == "__main__":
    run()
