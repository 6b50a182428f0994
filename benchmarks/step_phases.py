"""Where a training step's time goes, by phase, in wall-clock time (no profiler).

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m benchmarks.step_phases --batch-sizes 1 2

ResNet-20 (``benchmarks.train_step``'s model and data), window 4, SGD with momentum, one thread:
for BatchNorm and the CBN variants, the median over ``--steps`` steps (after the windows are full)
of each phase of the step:

- ``forward``, ``backward``, ``optimizer`` (``zero_grad`` and ``step``): the whole step;
- inside the forward, from forward hooks (public API: no library code is patched): the producers'
  forwards (every convolution), the norm layers' forwards (BatchNorm, or CBN's per-layer path:
  pairing, fingerprint, summary, normalization, record ticket), and, in a converted model, the
  model-level step before the forward (all windows summarized: ``cbn.model_step.prepare_summaries``)
  and after it (all records written: statistic gradients, entries, running statistics);
- ``other forward``: the rest (activations, pooling, the loss, the hooks' own cost).

Variants alternate step by step in one process (their order rotates), as in ``train_step``. The
hooks cost a few microseconds per module for every variant alike; read the differences to
BatchNorm of one run. ``--json`` writes every median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.train_step import _data, build, command_line, machine_info

PHASES = ("forward", "summaries", "producers", "norm layers", "record", "other forward", "backward", "optimizer",
          "step")
VARIANTS = ("bn", "cbn", "cbn-diff")


class PhaseClock:
    """Forward hooks that add each phase's wall-clock time of one step into ``times``."""

    def __init__(self, model: nn.Module) -> None:
        self.times = dict.fromkeys(PHASES, 0.0)
        self._started: dict[int, float] = {}
        from cbn import CrossIterationBatchNormBase

        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                self._time_module(module, "producers")
            elif isinstance(module, (nn.BatchNorm2d, CrossIterationBatchNormBase)):
                self._time_module(module, "norm layers")
        # Around the model-level step's own hooks: ours run first (prepended) and last.
        model.register_forward_pre_hook(self._start("summaries"), prepend=True)
        model.register_forward_pre_hook(self._stop("summaries"))
        model.register_forward_hook(self._start("record"), prepend=True)
        model.register_forward_hook(self._stop("record"), always_call=True)

    def _start(self, phase: str):
        def hook(*_):
            self._started[phase] = time.perf_counter()
        return hook

    def _stop(self, phase: str):
        def hook(*_):
            self.times[phase] += time.perf_counter() - self._started.pop(phase)
        return hook

    def _time_module(self, module: nn.Module, phase: str) -> None:
        key = f"{phase}:{id(module)}"
        module.register_forward_pre_hook(self._start(key))
        module.register_forward_hook(lambda *_: self.times.__setitem__(
            phase, self.times[phase] + time.perf_counter() - self._started.pop(key)))

    def reset(self) -> None:
        self.times = dict.fromkeys(PHASES, 0.0)


class PhaseTrainer:
    """One SGD training step of ``model`` on one batch, timed by phase."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
        self.model = model.train()
        self.x, self.target = x, target
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.clock = PhaseClock(model)

    def step(self) -> dict[str, float]:
        clock = self.clock
        clock.reset()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        zeroed = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.target)
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        self.optimizer.step()
        loss.item()
        end = time.perf_counter()
        times = clock.times
        times["forward"] = forward_end - zeroed
        times["backward"] = backward_end - forward_end
        times["optimizer"] = (zeroed - start) + (end - backward_end)
        times["step"] = end - start
        times["other forward"] = times["forward"] - sum(times[p] for p in ("summaries", "producers", "norm layers",
                                                                           "record"))
        return dict(times)


def measure(batch: int, variants: list[str], steps: int, warmup: int, window: int, seed: int) -> dict[str, dict]:
    x, target = _data(batch, seed)
    trainers = {variant: PhaseTrainer(build(variant, window, seed), x, target) for variant in variants}
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.step()
    samples: dict[str, list[dict]] = {variant: [] for variant in variants}
    for r in range(steps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            samples[variant].append(trainers[variant].step())
    return {variant: {phase: 1e3 * statistics.median(s[phase] for s in samples[variant]) for phase in PHASES}
            for variant in variants}


def markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}` (medians in ms; in brackets the difference to BatchNorm)", ""]
    for batch, by_variant in results.items():
        variants = list(by_variant)
        lines += [f"Batch {batch}:", "", "| phase | " + " | ".join(variants) + " |",
                  "|---|" + "---|" * len(variants)]
        base = by_variant.get("bn")
        for phase in PHASES:
            cells = []
            for variant in variants:
                value = by_variant[variant][phase]
                extra = f" ({value - base[phase]:+.2f})" if base is not None and variant != "bn" else ""
                cells.append(f"{value:.2f}{extra}")
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=8, help="steps first (windows full)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("step_phases", argv if argv is not None else sys.argv[1:])
    results = {batch: measure(batch, list(args.variants), args.steps, args.warmup, args.window, args.seed)
               for batch in args.batch_sizes}
    print(markdown(results, command))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": machine_info(args.threads),
                                         "results": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
