"""Training-step cost of CBN against BatchNorm, a cost floor and the authors' algorithm.

Run from the repository root::

    PYTHONPATH=src:. python -m benchmarks.train_step            # the full run (threads=2)
    PYTHONPATH=src:. python -m benchmarks.train_step --smoke    # seconds, tiny sizes

Measures, on the project's ResNet-20 (1x28x28 input, 10 classes, SGD):

1. time of one training step (zero_grad + forward + cross-entropy + backward + SGD step) for
   ``bn`` (nn.BatchNorm2d), ``floor`` (BatchNorm plus one extra weight-gradient convolution per
   normalized conv, the least work a compensated CBN can do), ``cbn`` (the paper's rule,
   ``differentiable_compensation=False``), ``cbn-diff`` (the default, ``differentiable_compensation=True``), ``naive`` (CBN with ``compensate=False``) and ``authors`` (the port in ``benchmarks/authors_cbn.py``), per batch
   size and window. Variants of one batch size are built fresh from the same seed, warmed up
   until every window is full, then timed round-robin (the order rotates every round) in one
   process; medians and ratios to BN from the same run are reported;
2. window-state memory: bytes of the layers' windows (``layer.window_state``, CBN) or of the Python-list tensors
   (authors) against (k - 1) x the bytes of the paired conv weights;
3. eval-mode forward time after ``cbn.revert_model`` and conv+BN folding with
   ``torch.nn.utils.fusion.fuse_conv_bn_eval``, against a folded BatchNorm model (interleaved);
4. aten ops dispatched per training step (``torch.profiler``), BN vs floor vs CBN vs authors.

Writes a JSON with every figure and a markdown report (``docs/performance-<threads>.md`` by default).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from benchmarks.authors_cbn import authors_resnet20
from benchmarks.authors_cbn import window_bytes as authors_window_bytes
from cbn.experiments.models import resnet20
from cbn.functional.statistic_gradients import _in_compiled_convolution_layout

# Environment variables that change CPU timings; recorded in the command line of the report.
ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "CBN_KERNELS_SIMD")
VARIANTS = ("bn", "floor", "cbn", "naive", "cbn-python", "naive-python", "authors")
WINDOWED = ("cbn", "cbn-diff", "naive", "cbn-python", "naive-python", "authors")
# Run on request (--variants): CBN without its C++ kernels, for an interleaved comparison.
PYTHON_VARIANTS = ("cbn-python", "naive-python")
# Run on request too (--variants), outside VARIANTS: CBN with differentiable compensation (an
# option, not yet the default). ALL_VARIANTS: every choice, in the order of the report's columns.
EXTRA_VARIANTS = ("cbn-diff",)
ALL_VARIANTS = (*VARIANTS[:3], *EXTRA_VARIANTS, *VARIANTS[3:])
LABELS = {
    "bn": "BatchNorm",
    "floor": "floor (BN + 1 wgrad conv)",
    "cbn": "CBN",
    "cbn-diff": "CBN (differentiable)",
    "naive": "naive CBN",
    "cbn-python": "CBN (Python)",
    "naive-python": "naive CBN (Python)",
    "authors": "authors' port",
}


# --------------------------------------------------------------------------------------------
# Models


class WeightGradFloor(nn.Module):
    """A conv that, in training, also runs one weight-gradient convolution of its own output.

    This is the cost floor of compensated CBN: the second-moment gradient is exactly one
    weight-gradient convolution per normalized conv (see the maths note); everything else
    (the mean input patch, a few per-channel vectors) is small next to it. The gradient is
    written into a buffer, as CBN writes its window, so that a compiled graph keeps the
    convolution instead of dropping it as dead code; inside a compiled graph its operands take
    the layout that compiled CBN gives its own statistic-gradient convolutions.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("weight_gradient", torch.zeros_like(conv.weight), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.training:
            c = self.conv
            with torch.no_grad():
                conv_input, conv_output = x.detach(), y.detach()
                if torch.compiler.is_compiling():
                    conv_input, conv_output = _in_compiled_convolution_layout(conv_input, conv_output)
                _, weight_gradient, _ = torch.ops.aten.convolution_backward(
                    conv_output, conv_input, c.weight.detach(), None, c.stride, c.padding,
                    c.dilation, False, [0] * len(c.padding), c.groups, [False, True, False],
                )
                self.weight_gradient.copy_(weight_gradient)
        return y


def _pairs(model: nn.Module, norm_type: type) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, norm name) for every Conv2d child registered just before a
    ``norm_type`` child: how the project's ResNets lay out ``norm(conv(x))``."""
    found = []
    for parent in model.modules():
        names = list(parent._modules.keys())
        for first, second in zip(names, names[1:]):
            if isinstance(parent._modules[first], nn.Conv2d) and isinstance(
                parent._modules[second], norm_type
            ):
                found.append((parent, first, second))
    return found


def add_floor(model: nn.Module, floor: Callable[[nn.Conv2d], nn.Module] = WeightGradFloor) -> nn.Module:
    """``model`` with each convolution that feeds a BatchNorm wrapped in ``floor``."""
    for parent, conv_name, _ in _pairs(model, nn.BatchNorm2d):
        parent._modules[conv_name] = floor(parent._modules[conv_name])
    return model


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every (Conv2d, BatchNorm2d) pair of an eval-mode model into the conv."""
    pairs = _pairs(model, nn.BatchNorm2d)
    for parent, conv_name, norm_name in pairs:
        parent._modules[conv_name] = fuse_conv_bn_eval(
            parent._modules[conv_name], parent._modules[norm_name]
        )
        parent._modules[norm_name] = nn.Identity()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise RuntimeError("a BatchNorm was left unfolded")
    return model


def build(variant: str, window: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if variant == "bn":
        return resnet20()
    if variant == "floor":
        return add_floor(resnet20())
    if variant in ("cbn", "cbn-diff", "naive", *PYTHON_VARIANTS):
        import cbn

        return cbn.convert_model(resnet20(), window=window, compensate=variant.startswith("cbn"),
                                 differentiable_compensation=variant == "cbn-diff")
    if variant == "authors":
        return authors_resnet20(window=window)
    raise ValueError(variant)


def paired_conv_weight_bytes(seed: int = 0) -> int:
    """Bytes of the weights of the convs that feed a norm in ResNet-20."""
    model = resnet20()
    return sum(
        p._modules[c].weight.numel() * p._modules[c].weight.element_size()
        for p, c, _ in _pairs(model, nn.BatchNorm2d)
    )


def window_state_bytes(variant: str, model: nn.Module) -> int:
    if variant == "authors":
        return authors_window_bytes(model)["total"]
    from cbn import CrossIterationBatchNormBase

    return sum(m.window_state.nbytes() for m in model.modules() if isinstance(m, CrossIterationBatchNormBase))


# --------------------------------------------------------------------------------------------
# Measures


class Trainer:
    """SGD training steps of ``model`` on one batch; ``python``: without cbn's C++ kernels."""

    def __init__(self, model: nn.Module, x: Tensor, target: Tensor, python: bool = False) -> None:
        self.model = model.train()
        self.x, self.target = x, target
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.python = python

    def step(self) -> float:
        if self.python:
            import cbn.kernels

            with cbn.kernels.use_kernels(False):
                return self._step()
        return self._step()

    def _step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        self.opt.step()
        return loss.item()


def _data(batch: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def _summary(samples: list[float]) -> dict:
    qs = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {
        "median_ms": 1e3 * statistics.median(samples),
        "p25_ms": 1e3 * qs[0],
        "p75_ms": 1e3 * qs[2],
        "min_ms": 1e3 * min(samples),
        "n": len(samples),
    }


def interleave(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Time every callable once per round, rotating the order each round."""
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
    return times


def median_microseconds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Call every callable once to warm it up, then :func:`interleave` them; medians in us."""
    for fn in fns.values():
        fn()
    return {key: 1e6 * statistics.median(samples) for key, samples in interleave(fns, rounds).items()}


def measure_train(args, log) -> tuple[list[dict], list[dict]]:
    rows, memory = [], []
    conv_bytes = paired_conv_weight_bytes()
    warmup = max(args.warmup, max(args.windows) + 1)
    for batch in args.batch_sizes:
        x, target = _data(batch, args.seed)
        trainers: dict[str, Trainer] = {}
        keys: dict[str, tuple[str, int | None]] = {}
        for variant in args.variants:
            for window in args.windows if variant in WINDOWED else [None]:
                key = variant if window is None else f"{variant}@{window}"
                trainers[key] = Trainer(build(variant, window or 1, args.seed), x, target,
                                        python=variant in PYTHON_VARIANTS)
                keys[key] = (variant, window)
        for trainer in trainers.values():
            for _ in range(warmup):
                trainer.step()
        if batch == args.batch_sizes[0]:
            for key, trainer in trainers.items():
                variant, window = keys[key]
                if window is not None:
                    memory.append({
                        "variant": variant,
                        "window": window,
                        "bytes": window_state_bytes(variant, trainer.model),
                        "reference_bytes": (window - 1) * conv_bytes,
                    })
        t0 = time.perf_counter()
        times = interleave({k: t.step for k, t in trainers.items()}, args.steps)
        bn_median = statistics.median(times["bn"]) if "bn" in times else None
        for key, samples in times.items():
            variant, window = keys[key]
            row = {"batch": batch, "variant": variant, "window": window, **_summary(samples)}
            if bn_median:
                row["ratio_to_bn"] = statistics.median(samples) / bn_median
            if variant == "cbn-diff" and f"cbn@{window}" in times:
                row["ratio_to_cbn"] = statistics.median(samples) / statistics.median(times[f"cbn@{window}"])
            rows.append(row)
        log(f"train batch={batch}: {len(trainers)} variants x {args.steps} rounds "
            f"in {time.perf_counter() - t0:.1f}s; " + ", ".join(
                f"{k} {1e3 * statistics.median(v):.1f}ms" for k, v in times.items()))
    for entry in memory:
        entry["ratio_to_reference"] = entry["bytes"] / entry["reference_bytes"]
    return rows, memory


def measure_eval(args, log) -> list[dict]:
    """Folded BN model vs CBN model reverted to BN and folded (and CBN unfolded, for scale)."""
    import cbn

    warm_x, warm_t = _data(8, args.seed)
    models = {}
    for variant in ("bn", "cbn"):
        trainer = Trainer(build(variant, args.eval_window, args.seed), warm_x, warm_t)
        for _ in range(max(args.warmup, args.eval_window + 1)):
            trainer.step()
        models[variant] = trainer.model.eval()
    cbn_eval = models["cbn"]
    reverted = cbn.revert_model(copy.deepcopy(cbn_eval)).eval()
    folded = {
        "bn_folded": fold_conv_bn(copy.deepcopy(models["bn"])),
        "cbn_folded": fold_conv_bn(reverted),
        "cbn_unfolded": cbn_eval,
    }
    rows = []
    with torch.inference_mode():
        for batch in args.eval_batch_sizes:
            x, _ = _data(batch, args.seed + 1)
            max_diff = (folded["cbn_folded"](x) - cbn_eval(x)).abs().max().item()
            fns = {k: (lambda m=m: m(x)) for k, m in folded.items()}
            for fn in fns.values():
                for _ in range(3):
                    fn()
            times = interleave(fns, args.eval_steps)
            base = statistics.median(times["bn_folded"])
            for key, samples in times.items():
                rows.append({
                    "batch": batch, "variant": key, **_summary(samples),
                    "ratio_to_bn_folded": statistics.median(samples) / base,
                })
            rows.append({"batch": batch, "variant": "cbn_folded_vs_cbn_eval_max_abs_diff",
                         "value": max_diff})
            log(f"eval batch={batch}: " + ", ".join(
                f"{k} {1e3 * statistics.median(v):.2f}ms" for k, v in times.items()))
    return rows


def count_ops(model: nn.Module, x: Tensor, target: Tensor, python: bool = False) -> dict:
    trainer = Trainer(model, x, target, python)
    for _ in range(3):
        trainer.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    kernel_calls = sum(e.name.startswith("cbn::") for e in prof.events())

    def top_level(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return {
        "aten_ops": len(events),
        "top_level_aten_ops": sum(top_level(e) for e in events),
        "distinct_aten_ops": len({e.name for e in events}),
        "cbn_kernel_calls": kernel_calls,
    }


def measure_ops(args, log) -> list[dict]:
    x, target = _data(args.profile_batch, args.seed)
    rows = []
    for variant in args.variants:
        window = args.profile_window if variant in WINDOWED else None
        counts = count_ops(build(variant, window or 1, args.seed), x, target, variant in PYTHON_VARIANTS)
        rows.append({"variant": variant, "window": window, "batch": args.profile_batch, **counts})
    base = next((r for r in rows if r["variant"] == "bn"), None)
    for row in rows:
        if base:
            row["ratio_to_bn"] = row["aten_ops"] / base["aten_ops"]
    log("ops: " + ", ".join(f"{r['variant']} {r['aten_ops']}" for r in rows))
    return rows


# --------------------------------------------------------------------------------------------
# Report


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers of a
    markdown file (appended, with the markers, when they are not there yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def run_section(module: str, section: str, args, argv: list[str] | None,
                measure: Callable, render: Callable) -> tuple[list, dict]:
    """The run of a benchmark that writes one section of ``docs/performance.md``.

    Sets ``args.threads``, calls ``measure(args, log)`` (progress to stderr), renders the rows with
    ``render(rows, command, machine)``, prints the text and writes it between the ``section``
    markers of ``args.md`` when given. Returns the rows and their context: the command line, the
    machine and the wall time of the measurement.
    """
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    start = time.perf_counter()
    rows = measure(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    context = {
        "command": command_line(module, sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "wall_s": time.perf_counter() - start,
    }
    text = render(rows, context["command"], machine)
    print(text)
    if args.md:
        write_section(args.md, section, text)
    return rows, context


def rounded(values) -> tuple:
    """A load average (or any few figures) to two decimals, for a report line."""
    return tuple(round(v, 2) for v in values)


def command_line(module: str, argv: list[str]) -> str:
    """How a benchmark module was run, for the report beside its figures."""
    return f"PYTHONPATH=src:. python -m benchmarks.{module} {' '.join(argv)}".strip()


def machine_info(threads: int) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001 - not a git checkout
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "cbn_kernels": cbn_kernels_available(),
        "cbn_kernels_instruction_set": cbn_kernels_instruction_set(),
        "load_average_start": os.getloadavg(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def cbn_kernels_available() -> bool:
    import cbn.kernels

    return cbn.kernels.available()


def cbn_kernels_instruction_set() -> str | None:
    import cbn.kernels

    return cbn.kernels.instruction_set()


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    text = f"{row['median_ms']:.2f} ms"
    if "ratio_to_bn" in row:
        text += f" ({row['ratio_to_bn']:.2f}x"
        text += f"; {row['ratio_to_cbn']:.2f}x CBN)" if "ratio_to_cbn" in row else ")"
    return text


def markdown(result: dict) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        "# Performance: CBN against BatchNorm, a cost floor and the authors' algorithm",
        "",
        "Produced by `benchmarks/train_step.py`. Command:",
        "",
        f"    {result['command']}",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, **{m['threads']} torch thread(s)**, "
        f"torch {m['torch']}, Python {m['python']}, commit {m['git_commit']}, {m['date']}. "
        f"Load average at start {rounded(m['load_average_start'])}, "
        f"at end {rounded(m['load_average_end'])}: the machine is shared, so "
        "absolute times are noisy; variants are interleaved round-robin in one process and the "
        "ratios (to BatchNorm of the same run) are the figures to read. Wall time of the run "
        f"{result['wall_s']:.0f} s.",
        "",
        "Variants: **BatchNorm** (`nn.BatchNorm2d`); **floor**: BatchNorm plus one extra "
        "weight-gradient convolution per normalized conv (`aten.convolution_backward`, output "
        "mask [False, True, False]), the least work compensated CBN can do; **CBN** "
        "(the paper's rule: `cbn.convert_model(model, window=k, differentiable_compensation=False)`); "
        "**CBN (differentiable)** (the library's default, `differentiable_compensation=True`: gradients through the compensated past into the "
        "producers; in brackets also its ratio to CBN); **naive CBN** (`compensate=False`); "
        "**authors' port** (`benchmarks/authors_cbn.py`: two `autograd.grad` calls per layer and "
        "three weight-sized tensors per past iteration in Python lists); where run, **(Python)**: "
        "the same CBN without its C++ kernels (`cbn.kernels.use_kernels(False)`). C++ kernels "
        f"{'in use' if m.get('cbn_kernels') else 'not available: every CBN variant ran in Python'}.",
        "",
        "## Training step time (ResNet-20, forward + backward + SGD step)",
        "",
        f"Median of {a['steps']} interleaved rounds after {max(a['warmup'], max(a['windows']) + 1)} "
        "warm-up steps (windows full); in brackets the ratio to BatchNorm of the same batch size.",
        "",
    ]
    present = [v for v in ALL_VARIANTS if v in a["variants"]]
    lines.append("| batch | window | " + " | ".join(LABELS[v] for v in present) + " |")
    lines.append("|---|---|" + "---|" * len(present))
    train = result["train"]
    for batch in a["batch_sizes"]:
        for window in a["windows"]:
            cells = []
            for v in present:
                w = window if v in WINDOWED else None
                cells.append(_cell(next((r for r in train if r["batch"] == batch and
                                         r["variant"] == v and r["window"] == w), None)))
            lines.append(f"| {batch} | {window} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "BatchNorm and the floor do not depend on the window: their figure is repeated on each "
        "window row of a batch size.",
        "",
        "## Window-state memory",
        "",
        "Bytes of the `window_*` buffers (CBN) or of the tensors in the Python lists (authors' "
        "port), with full windows, against (k - 1) x the bytes of the 21 paired conv weights "
        f"({paired_conv_weight_bytes()} bytes, float32).",
        "",
        "| window k | (k-1) x weight bytes | " + " | ".join(LABELS[v] for v in WINDOWED
                                                       if v in present) + " |",
        "|---|---|" + "---|" * len([v for v in WINDOWED if v in present]),
    ]
    for window in a["windows"]:
        cells, ref = [], None
        for v in WINDOWED:
            if v not in present:
                continue
            row = next((r for r in result["memory"] if r["variant"] == v and r["window"] == window), None)
            ref = row["reference_bytes"] if row else ref
            cells.append("-" if row is None else f"{row['bytes']} ({row['ratio_to_reference']:.3f}x)")
        lines.append(f"| {window} | {ref} | " + " | ".join(cells) + " |")
    if result.get("eval"):
        lines += [
            "",
            "## Eval-mode forward time",
            "",
            f"CBN model (window {a['eval_window']}) trained a few steps, then `cbn.revert_model` "
            "and `fuse_conv_bn_eval` on every conv+BN pair, against the BatchNorm model folded "
            f"the same way; CBN in eval mode unfolded for scale. Median of {a['eval_steps']} "
            "interleaved rounds under `torch.inference_mode()`.",
            "",
            "| batch | BN folded | CBN reverted + folded | CBN eval, unfolded | max abs diff folded vs unfolded CBN |",
            "|---|---|---|---|---|",
        ]
        ev = result["eval"]
        for batch in a["eval_batch_sizes"]:
            get = lambda v: next(r for r in ev if r["batch"] == batch and r["variant"] == v)  # noqa: E731
            cells = [
                f"{get(v)['median_ms']:.2f} ms ({get(v)['ratio_to_bn_folded']:.2f}x)"
                for v in ("bn_folded", "cbn_folded", "cbn_unfolded")
            ]
            diff = get("cbn_folded_vs_cbn_eval_max_abs_diff")["value"]
            lines.append(f"| {batch} | " + " | ".join(cells) + f" | {diff:.1e} |")
    lines += [
        "",
        "## Aten ops per training step",
        "",
        f"`torch.profiler` (CPU) over one training step at batch {a['profile_batch']}, window "
        f"{a['profile_window']}: every `aten::` event (nested calls included), the top-level ones "
        "(no `aten::` ancestor: what Python dispatched) and the distinct op names.",
        "",
        "| variant | aten ops | ratio to BN | top-level aten ops | distinct ops |",
        "|---|---|---|---|---|",
    ]
    for row in result["ops"]:
        lines.append(f"| {LABELS[row['variant']]} | {row['aten_ops']} | "
                     f"{row.get('ratio_to_bn', float('nan')):.2f}x | {row['top_level_aten_ops']} | "
                     f"{row['distinct_aten_ops']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    p.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS,
                   default=[v for v in VARIANTS if v not in PYTHON_VARIANTS])
    p.add_argument("--steps", type=int, default=30, help="timed round-robin rounds per batch size")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps per model before timing (at least max window + 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2 or 1)")
    p.add_argument("--eval-batch-sizes", type=int, nargs="+", default=None,
                   help="default: the training batch sizes")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-window", type=int, default=4)
    p.add_argument("--profile-batch", type=int, default=2)
    p.add_argument("--profile-window", type=int, default=4)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--no-ops", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    # Defaults: docs/performance-1thread.{json,md} or docs/performance-2threads.{json,md}; the
    # hand-written summary docs/performance.md quotes them.
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for a test: batch 2, window 2, 3 steps, 1 thread")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.windows, args.steps, args.warmup = [2], [2], 3, 2
        args.threads, args.eval_steps, args.eval_window = 1, 3, 2
        args.eval_batch_sizes, args.profile_batch, args.profile_window = [2], 2, 2
    if args.eval_batch_sizes is None:
        args.eval_batch_sizes = list(args.batch_sizes)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        machine = machine_info(args.threads)
        train, memory = measure_train(args, log)
        evals = [] if args.no_eval else measure_eval(args, log)
        ops = [] if args.no_ops else measure_ops(args, log)
    finally:
        torch.set_num_threads(threads_before)
    machine["load_average_end"] = os.getloadavg()
    result = {
        "command": " ".join(
            [f"{k}={os.environ[k]}" for k in ENV_VARS if k in os.environ]
            + ["PYTHONPATH=src:. python -m benchmarks.train_step", shlex.join(argv)]
        ).strip(),
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - start,
        "paired_conv_weight_bytes": paired_conv_weight_bytes(),
        "train": train,
        "memory": memory,
        "eval": evals,
        "ops": ops,
    }
    stem = Path("docs") / (f"performance-{args.threads}thread" + ("s" if args.threads > 1 else ""))
    args.json = args.json or stem.with_suffix(".json")
    args.md = args.md or stem.with_suffix(".md")
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.md, markdown(result))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    log(f"wrote {args.json} and {args.md} in {result['wall_s']:.0f}s")
    return result


if __name__ == "__main__":
    run()
