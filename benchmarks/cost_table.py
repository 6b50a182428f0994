"""The paper's cost table (Table 6 analog): BN, GroupNorm, Batch Renorm, naive CBN, CBN and the
authors' algorithm on the project's ResNet-20, at two batch sizes; and BN, GroupNorm and CBN on
the detector of ``examples/detector.py`` (``--model detector``).

Run from the repository root::

    PYTHONPATH=src:. python -m benchmarks.cost_table --md docs/performance.md
    PYTHONPATH=src:. python -m benchmarks.cost_table --model detector --md docs/performance.md

Per variant and batch size:

- **extra persistent memory**, beyond BatchNorm's running statistics: from the formula of each
  method (theory) and from the model's buffers and window lists (measured);
- **FLOPs of one training step** (forward, backward, SGD), from the layer shapes (theory: every
  convolution and matrix product, counted as ``torch.utils.flop_counter`` counts them, plus the
  element-wise Taylor products and the kernels' own convolution loops it does not count) and from
  ``FlopCounterMode``;
- **training-step time**, variants interleaved round-robin in one process, medians;
- **inference time** of the eval-mode model: BN and Batch Renorm folded into the convolutions,
  naive CBN and CBN after ``cbn.revert_model`` and folding, GroupNorm and the authors' layer as
  they are (neither folds).

With ``--model detector`` (Faster R-CNN + FPN of ``examples/detector.py``, norms in the backbone,
FPN and box head, on composed Fashion-MNIST scenes; see :func:`measure_detector`): measured figures
only, per variant: extra persistent memory (buffers), peak memory of one training step, FLOPs of one
training step and of one inference call, training-step and inference times (interleaved, medians).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.train_step import (
    Trainer,
    _data,
    _pairs,
    build,
    fold_conv_bn,
    interleave,
    rounded,
    run_section,
    window_state_bytes,
)
from cbn import kernels
from cbn.experiments.models import resnet20
from cbn.experiments.norms import make_norm

VARIANTS = ("bn", "gn", "brn", "naive", "cbn", "authors")
LABELS = {"bn": "BatchNorm", "gn": "GroupNorm", "brn": "Batch Renorm", "naive": "naive CBN", "cbn": "CBN",
          "authors": "authors' CBN"}
FLOAT = 4  # bytes


def build_variant(variant: str, window: int, seed: int) -> nn.Module:
    if variant in ("gn", "brn"):
        torch.manual_seed(seed)
        return resnet20(make_norm(variant))
    return build(variant, window, seed)


def conv_shapes(batch: int) -> list[dict]:
    """Every convolution of ResNet-20 at ``batch``: its sizes, and whether a BatchNorm follows it."""
    model = resnet20()
    paired = {id(parent._modules[conv]) for parent, conv, _ in _pairs(model, nn.BatchNorm2d)}
    shapes = []

    def hook(module, args, output):
        shapes.append({
            "out_channels": output.shape[1], "positions": output.shape[2] * output.shape[3],
            "fan_in": module.weight[0].numel(), "batch": output.shape[0], "paired": id(module) in paired,
            "first": module is model.conv1, "in_channels": module.in_channels,
            "taps": module.weight[0, 0].numel(), "unit_stride": all(v == 1 for v in module.stride),
        })

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(_data(batch, 0)[0])
    for handle in handles:
        handle.remove()
    return shapes


def _in_direct_loops(shape: dict) -> bool:
    """Whether ``cbn::convolution_statistic_gradients`` sums a layer below batch 8 in its own loops
    (``form_of`` in ``src/cbn/csrc/statistic_gradients.cpp``): two or more taps, at most 64 input
    channels; in eights within the channel vectors' bounds, else (a stem) at stride 1."""
    n, cin, cout, positions = shape["batch"], shape["in_channels"], shape["out_channels"], shape["positions"]
    if shape["taps"] < 2 or cin > 64:
        return False
    if cin % 8:
        return shape["unit_stride"]
    work = cin * n * positions
    if cout > 2 * cin:
        return False
    if shape["unit_stride"]:
        return work <= (102400 if cin <= 32 else 12800)
    return cin <= 32 and work * cout <= 409600


def theory_flops(variant: str, batch: int, window: int, with_kernels: bool = True) -> dict:
    """FLOPs of one training step from the shapes (2 per multiply-add); ``with_kernels``: whether
    cbn's C++ kernels run (they take the mean shifts out of ATen's matrix product, and below batch
    8 the statistic-gradient convolutions out of ATen's weight gradient)."""
    counted = uncounted = 0
    past = window - 1
    for s in conv_shapes(batch):
        n, c, p, f = s["batch"], s["out_channels"], s["positions"], s["fan_in"]
        conv = 2 * n * p * c * f
        # forward, weight gradient, and the input gradient except for the image
        counted += conv * (2 if s["first"] else 3)
        if not s["paired"]:
            continue
        if variant == "cbn":
            # one weight-gradient convolution: C variance rows plus the mean patch (an extra
            # channel below batch 8, a batch-summed convolution from 8 on). Below batch 8 the
            # kernels take small layers in their own loops, outside ATen, and give the others'
            # mean patch from window sums beside a weight gradient of C rows.
            if n >= 8:
                counted += conv + 2 * p * f
            elif not with_kernels:
                counted += 2 * n * p * (c + 1) * f
            elif _in_direct_loops(s):
                uncounted += 2 * n * p * (c + 1) * f
            else:
                counted += conv
                uncounted += 2 * n * p * f
            # Mean shifts, k entries (k - 1 moved, 1 stored): a matrix product without the
            # kernels, in the kernel's pass with the variance shifts with them.
            if with_kernels:
                uncounted += 2 * window * c * f
            else:
                counted += 2 * window * c * f
            uncounted += 2 * window * c * f  # variance shifts: element-wise products and sums
        elif variant == "authors":
            counted += 2 * conv  # autograd.grad of the mean and of the second moment
            uncounted += 2 * past * 2 * c * f  # two Taylor products with each stored weight
    fc_in, fc_out = 64, 10
    counted += 3 * 2 * batch * fc_in * fc_out
    return {"counted": counted, "uncounted": uncounted}


class _FlopCount(TorchDispatchMode):
    """``FlopCounterMode``'s per-operator formulas without its module tracker, whose backward
    hooks refuse the ``autograd.grad`` calls of the authors' layer."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def measured_flops(model: nn.Module, batch: int, seed: int) -> int:
    trainer = Trainer(model, *_data(batch, seed))
    with _FlopCount() as counter:
        trainer.step()
    return counter.total


def theory_memory(variant: str, window: int) -> int:
    """Extra persistent bytes beyond BatchNorm's running statistics (2 C floats and a counter)."""
    total = 0
    past = window - 1
    for s in conv_shapes(1):
        if not s["paired"]:
            continue
        c, f = s["out_channels"], s["fan_in"]
        if variant == "gn":
            total -= 2 * c * FLOAT + 8  # no running statistics
        elif variant in ("naive", "cbn"):
            total += past * 5 * c * FLOAT + 8  # the window's entries and the iteration count
            if variant == "cbn":
                total += past * (c + 1) * f * FLOAT  # variance rows and mean patch per entry
        elif variant == "authors":
            total += past * (3 * c * f + 2 * c) * FLOAT  # two gradients and a weight copy, mu and nu
    return total


def measured_memory(variant: str, model: nn.Module, reference: nn.Module) -> int:
    def buffers(m):
        return sum(b.numel() * b.element_size() for b in m.buffers())

    extra = buffers(model) - buffers(reference)
    return extra + window_state_bytes(variant, model)


def eval_model(variant: str, model: nn.Module) -> nn.Module:
    import cbn

    model = copy.deepcopy(model).eval()
    if variant in ("naive", "cbn"):
        return fold_conv_bn(cbn.revert_model(model).eval())
    if variant in ("bn", "brn"):
        return fold_conv_bn(_as_batchnorm(model))
    return model


def _as_batchnorm(model: nn.Module) -> nn.Module:
    """Batch Renorm in eval mode is BatchNorm with its running statistics: swap it for folding."""
    from cbn.layers.batch_renorm import BatchRenorm2d

    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, BatchRenorm2d):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps).eval()
                bn.load_state_dict({k: v for k, v in child.state_dict().items() if k in bn.state_dict()},
                                   strict=False)
                parent._modules[name] = bn
    return model


def measure(args, log) -> list[dict]:
    rows = []
    for batch in args.batch_sizes:
        x, target = _data(batch, args.seed)
        trainers = {v: Trainer(build_variant(v, args.window, args.seed), x, target) for v in args.variants}
        for trainer in trainers.values():
            for _ in range(max(args.warmup, args.window + 1)):
                trainer.step()
        times = interleave({v: t.step for v, t in trainers.items()}, args.steps)
        evals = {v: eval_model(v, t.model) for v, t in trainers.items()}
        with torch.inference_mode():
            for m in evals.values():
                for _ in range(3):
                    m(x)
            eval_times = interleave({v: (lambda m=m: m(x)) for v, m in evals.items()}, args.eval_steps)
        reference = trainers["bn"].model
        bn_step, bn_eval = statistics.median(times["bn"]), statistics.median(eval_times["bn"])
        for variant, trainer in trainers.items():
            flops = theory_flops(variant, batch, args.window, kernels.active())
            rows.append({
                "variant": variant, "batch": batch, "window": args.window,
                "memory_theory_bytes": theory_memory(variant, args.window),
                "memory_measured_bytes": measured_memory(variant, trainer.model, reference),
                "flops_theory_counted": flops["counted"], "flops_theory_elementwise": flops["uncounted"],
                "flops_measured": measured_flops(copy.deepcopy(trainer.model), batch, args.seed),
                "step_ms": 1e3 * statistics.median(times[variant]),
                "step_ratio": statistics.median(times[variant]) / bn_step,
                "eval_ms": 1e3 * statistics.median(eval_times[variant]),
                "eval_ratio": statistics.median(eval_times[variant]) / bn_eval,
            })
        log(f"batch {batch}: " + ", ".join(f"{r['variant']} {r['step_ms']:.1f} ms" for r in rows[-len(trainers):]))
    return rows


def _kib(value: int) -> str:
    return f"{value / 1024:+.1f}" if value else "0"


def markdown(rows: list[dict], command: str, machine: dict) -> str:
    lines = [
        "### Cost table: BatchNorm, GroupNorm, Batch Renorm, naive CBN, CBN, the authors' algorithm",
        "",
        f"Generated by `{command}` (commit {machine.get('git_commit')}, torch {torch.__version__}, "
        f"{machine.get('threads')} thread(s), load average at start {rounded(machine['load_average_start'])}).",
        "",
        "ResNet-20 on 1x28x28 inputs, window 4, SGD. Extra memory is the persistent state beyond "
        "BatchNorm's running statistics. FLOPs count every convolution and matrix product as "
        "`torch.utils.flop_counter` does (2 per multiply-add); the theory column adds, in brackets, "
        "what the counter does not see: the element-wise Taylor products and, in cbn's C++ kernels below "
        "batch 8, the statistic-gradient convolutions. Times are medians of "
        "interleaved rounds, as ratios to BatchNorm in the same run; inference is the eval-mode "
        "model, folded where it can be (BN, Batch Renorm, and CBN after `cbn.revert_model`).",
        "",
        "| method | batch | extra memory, theory / measured (KiB) | GFLOPs per step, theory [+ outside ATen] / flop_counter "
        "| training step (ms, x BN) | inference (ms, x BN) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        theory = r["flops_theory_counted"] / 1e9
        extra = f" [+{r['flops_theory_elementwise'] / 1e9:.4f}]" if r["flops_theory_elementwise"] else ""
        lines.append(
            f"| {LABELS[r['variant']]} | {r['batch']} | {_kib(r['memory_theory_bytes'])} / "
            f"{_kib(r['memory_measured_bytes'])} | {theory:.4f}{extra} / {r['flops_measured'] / 1e9:.4f} | "
            f"{r['step_ms']:.1f} ({r['step_ratio']:.2f}x) | {r['eval_ms']:.2f} ({r['eval_ratio']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The detector


DETECTOR_VARIANTS = ("bn", "gn", "cbn")


def peak_bytes(fn) -> int:
    """Peak bytes allocated by the CPU allocator while ``fn()`` runs, above the level at its start.

    From ``torch.profiler``'s memory events (``profile_memory=True``): every allocation and free
    is an event with a signed size; their running sum in time order is the memory ``fn`` holds,
    and its maximum is the peak (tensors alive before the call are not counted, those alive after
    it are). The events are read from the profiler's raw (kineto) results: its per-operator table
    attributes allocations to operators and keeps only the frees that happen outside them.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors a training step starts from: parameters, their gradients, buffers (CBN's
    windows included) and the optimizer's state, each storage counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class DetectorTrainer:
    """SGD steps of a torchvision detector on one fixed batch of composed scenes."""

    def __init__(self, model: nn.Module, images, targets) -> None:
        self.model = model.train()
        self.images, self.targets = images, targets
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = sum(self.model(self.images, self.targets).values())
        loss.backward()
        self.opt.step()
        return loss.item()


def detector_batch(batch: int, seed: int):
    """``batch`` composed scenes (real Fashion-MNIST test images) as detector input."""
    from cbn.experiments.data import load_split
    from cbn.experiments.scenes import compose_scenes
    from examples.detector import images_and_targets

    scenes = compose_scenes(*load_split("test"), batch, seed=seed)
    return images_and_targets(scenes, list(range(batch)))


def build_detector_variant(variant: str, window: int, seed: int) -> nn.Module:
    from examples.detector import build_detector

    torch.manual_seed(seed)
    return build_detector(variant, window=window)


def detector_eval_model(variant: str, model: nn.Module) -> nn.Module:
    """The model as it is deployed: BN folded into its convolutions, CBN reverted to BN and
    folded, GroupNorm as it is."""
    import cbn

    model = copy.deepcopy(model).eval()
    if variant == "cbn":
        model = cbn.revert_model(model).eval()
    return fold_conv_bn(model) if variant in ("bn", "cbn") else model


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_detector(args, log) -> list[dict]:
    """BN, GN and CBN on the detector, per batch size: every figure measured in this process."""
    import cbn

    rows = []
    for batch in args.batch_sizes:
        images, targets = detector_batch(batch, args.seed)
        trainers = {v: DetectorTrainer(build_detector_variant(v, args.window, args.seed), images, targets)
                    for v in args.variants}
        for variant, trainer in trainers.items():
            for _ in range(max(args.warmup, args.window + 1)):  # every CBN window full
                trainer.step()
            log(f"batch {batch}: {variant} warmed up")
        # Peak memory and FLOPs of one step each, on copies so the timed models keep their state.
        resident, peaks, train_flops = {}, {}, {}
        for variant, trainer in trainers.items():
            twin = DetectorTrainer(copy.deepcopy(trainer.model), images, targets)
            twin.opt.load_state_dict(trainer.opt.state_dict())
            twin.step()  # the optimizer state exists before the measured step, as in training
            resident[variant] = resident_bytes(twin.model, twin.opt)
            peaks[variant] = peak_bytes(twin.step)
            train_flops[variant] = flops_of(twin.step)
        times = interleave({v: t.step for v, t in trainers.items()}, args.steps)
        log(f"batch {batch}: training steps timed")
        evals = {v: detector_eval_model(v, t.model) for v, t in trainers.items()}
        with torch.inference_mode():
            eval_flops = {v: flops_of(lambda m=m: m(images)) for v, m in evals.items()}
            for m in evals.values():
                for _ in range(3):
                    m(images)
            eval_times = interleave({v: (lambda m=m: m(images)) for v, m in evals.items()}, args.eval_steps)
        reference = trainers["bn"].model
        bn_step, bn_eval = statistics.median(times["bn"]), statistics.median(eval_times["bn"])
        for variant, trainer in trainers.items():
            row = {
                "model": "detector", "variant": variant, "batch": batch, "window": args.window,
                "memory_measured_bytes": measured_memory(variant, trainer.model, reference),
                "resident_bytes": resident[variant], "peak_above_start_bytes": peaks[variant],
                "peak_train_bytes": resident[variant] + peaks[variant],
                "flops_train": train_flops[variant], "flops_eval": eval_flops[variant],
                "step_ms": 1e3 * statistics.median(times[variant]),
                "step_ratio": statistics.median(times[variant]) / bn_step,
                "eval_ms": 1e3 * statistics.median(eval_times[variant]),
                "eval_ratio": statistics.median(eval_times[variant]) / bn_eval,
            }
            if variant == "cbn":
                row["pairing"] = cbn.pairing_summary(cbn.pairing_report(trainer.model))
            rows.append(row)
        log(f"batch {batch}: " + ", ".join(f"{r['variant']} {r['step_ms']:.0f} ms" for r in rows[-len(trainers):]))
    return rows


def detector_markdown(rows: list[dict], command: str, machine: dict) -> str:
    build = " (CUDA build on CPU)" if torch.version.cuda and not torch.cuda.is_available() else ""
    pairing = next((r["pairing"] for r in rows if "pairing" in r), None)
    lines = [
        "### Cost table on a detector: Faster R-CNN + FPN with BatchNorm, GroupNorm, CBN",
        "",
        f"Generated by `{command}` (commit {machine.get('git_commit')}, torch {torch.__version__}{build}, "
        f"{machine.get('threads')} thread(s), load average at start {rounded(machine['load_average_start'])}).",
        "",
        "The model of `examples/detector.py`: torchvision `FasterRCNN`, ResNet-10 backbone, `BackboneWithFPN` "
        "(64 channels), `FastRCNNConvFCHead` with two normalized convolutions; the norm of the variant in "
        "the backbone, the FPN and the box head; 128x128 composed Fashion-MNIST scenes, SGD, window "
        f"{rows[0]['window']}" + (f" ({pairing})" if pairing else "") + ". "
        "Extra memory: persistent buffers beyond BatchNorm's. Peak: what a training step starts from "
        "(parameters, gradients, buffers, optimizer state) plus the most bytes the step allocates above "
        "that at once (CPU allocator events of `torch.profiler`). FLOPs: "
        "`torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add; it does not count torchvision's "
        "RoIAlign and NMS). Inference: the eval-mode model on the same images, BN folded into the "
        "convolutions, CBN reverted with `cbn.revert_model` and folded, GroupNorm as it is. Times: medians of "
        "interleaved rounds, ratios to BatchNorm in the same run.",
        "",
        "| method | batch | extra memory (KiB) | peak training-step memory (MiB) | GFLOPs training step "
        "| GFLOPs inference | training step (ms, x BN) | inference (ms, x BN) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['variant']]} | {r['batch']} | {_kib(r['memory_measured_bytes'])} | "
            f"{r['peak_train_bytes'] / 2**20:.1f} | {r['flops_train'] / 1e9:.2f} | {r['flops_eval'] / 1e9:.2f} | "
            f"{r['step_ms']:.0f} ({r['step_ratio']:.2f}x) | {r['eval_ms']:.0f} ({r['eval_ratio']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_table", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("resnet20", "detector"), default="resnet20",
                   help="detector: examples/detector.py's Faster R-CNN, variants bn, gn, cbn, batch 2")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 2 32 (resnet20), 2 (detector)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help=f"default: all (resnet20), {' '.join(DETECTOR_VARIANTS)} (detector)")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--eval-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--md", type=Path, default=None, help="write the table into this markdown file (its section)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    detector = args.model == "detector"
    if args.batch_sizes is None:
        args.batch_sizes = [2] if detector else [2, 32]
    if args.variants is None:
        args.variants = list(DETECTOR_VARIANTS if detector else VARIANTS)
    if detector and set(args.variants) - set(DETECTOR_VARIANTS):
        p.error(f"--model detector measures {', '.join(DETECTOR_VARIANTS)} only")
    return args


def run(argv=None) -> dict:
    import json

    args = parse_args(argv)
    if "bn" not in args.variants:
        args.variants = ["bn", *args.variants]
    if args.model == "detector":
        rows, context = run_section("cost_table", "cost-table-detector", args, argv, measure_detector,
                                    detector_markdown)
    else:
        rows, context = run_section("cost_table", "cost-table", args, argv, measure, markdown)
    result = {"command": context["command"], "machine": context["machine"], "rows": rows, "wall_s": context["wall_s"]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run()
