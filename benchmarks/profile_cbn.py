"""Where CBN's extra training-step time goes, per norm layer (torch.profiler, CPU).

    PYTHONPATH=src:. python -m benchmarks.profile_cbn --batch 2 --window 4 --threads 2

Profiles ``--steps`` training steps of ResNet-20 with BatchNorm and with the chosen variant
(CBN by default). Every norm module's forward is wrapped in a ``record_function`` range, so
aten ops dispatched inside a norm's forward are attributed to it. Reports, per norm layer and
step: the ops in the norm forward by count and by self CPU time, the backward (autograd) nodes
the variant adds over BatchNorm, and the whole-step op-count difference to BatchNorm.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from benchmarks.authors_cbn import AuthorsCBN2d
from benchmarks.train_step import Trainer, _data, build

RANGE = "norm_forward"


def norm_modules(model: nn.Module) -> list[nn.Module]:
    out = []
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, AuthorsCBN2d)) or "BatchNorm" in name:
            out.append(module)
    return out


def annotate(model: nn.Module) -> int:
    norms = norm_modules(model)
    for module in norms:
        inner = module.forward

        def forward(*args, _inner=inner, **kwargs):
            with torch.profiler.record_function(RANGE):
                return _inner(*args, **kwargs)

        module.forward = forward
    return len(norms)


PHASE = "phase:"


def wrap_phases() -> Callable[[], None]:
    """Wrap the CBN layer's internal steps in ``record_function`` ranges (monkeypatching the
    imported names; the core's source is not changed). Returns a function that undoes it."""
    from cbn.layers import cross_iteration_batchnorm as layer_module
    from cbn import model_step
    from cbn.layers import window_record, window_state

    targets = [
        (model_step, "record_steps"),  # model hook: all layers' steps
        (window_record, "record_steps"),  # a layer's own step
        (layer_module._CrossIterationBatchNorm, "_pair"),
        (layer_module, "producer_fingerprint"),
        (window_state.PositionWindow, "bind"),
        (window_state.PositionWindow, "summary"),
        (model_step, "prepare_summaries"),  # model pre-hook: outside the norm forwards
        (layer_module._CrossIterationBatchNorm, "_record"),
        (layer_module, "cross_iteration_batch_norm"),
        (window_record, "_update_running_stats"),
        (layer_module, "record_steps"),
        (layer_module, "producer_statistic_gradients"),
        (layer_module, "statistic_shifts"),
    ]
    originals = []
    for owner, attr in targets:
        inner = getattr(owner, attr, None)
        if inner is None or getattr(inner, "_phase_wrapped", False):
            continue
        originals.append((owner, attr, inner))

        def wrapped(*args, _inner=inner, _name=PHASE + attr, **kwargs):
            with torch.profiler.record_function(_name):
                return _inner(*args, **kwargs)

        wrapped._phase_wrapped = True
        setattr(owner, attr, wrapped)

    def undo() -> None:
        for owner, attr, inner in originals:
            setattr(owner, attr, inner)

    return undo


def phase_table(events, steps: int, n_norms: int) -> dict[str, dict]:
    """Inclusive CPU time and aten op count per phase range, per layer and step."""
    table: dict[str, dict] = {}
    for e in events:
        if e.name.startswith(PHASE):
            row = table.setdefault(e.name[len(PHASE):], {"calls": 0, "cpu_us": 0.0, "aten_ops": 0})
            row["calls"] += 1
            row["cpu_us"] += e.cpu_time_total
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(PHASE):
            parent = parent.cpu_parent
        if parent is not None:
            table[parent.name[len(PHASE):]]["aten_ops"] += 1
    per = steps * n_norms
    return {k: {kk: vv / per for kk, vv in v.items()} for k, v in table.items()}


def profile(variant: str, batch: int, window: int, steps: int, seed: int, phases: bool = False):
    x, target = _data(batch, seed)
    model = build(variant, window, seed)
    trainer = Trainer(model, x, target)
    for _ in range(window + 3):
        trainer.step()
    n_norms = annotate(model)
    undo = wrap_phases() if phases and variant in ("cbn", "naive") else (lambda: None)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                trainer.step()
    finally:
        undo()
    events = prof.events()
    inside_count: collections.Counter = collections.Counter()
    inside_self_us: collections.Counter = collections.Counter()
    top_inside: collections.Counter = collections.Counter()
    all_count: collections.Counter = collections.Counter()
    all_self_us: collections.Counter = collections.Counter()
    backward_nodes: collections.Counter = collections.Counter()
    norm_total_us = 0.0
    for e in events:
        if e.name == RANGE:
            norm_total_us += e.cpu_time_total
            continue
        if e.name.startswith("autograd::engine::evaluate_function: "):
            backward_nodes[e.name.split(": ", 1)[1]] += 1
            continue
        if not e.name.startswith("aten::"):
            continue
        all_count[e.name] += 1
        all_self_us[e.name] += e.self_cpu_time_total
        parent, first_aten_parent, in_norm = e.cpu_parent, None, False
        while parent is not None:
            if parent.name == RANGE:
                in_norm = True
                break
            if parent.name.startswith("aten::") and first_aten_parent is None:
                first_aten_parent = parent
            parent = parent.cpu_parent
        if in_norm:
            inside_count[e.name] += 1
            inside_self_us[e.name] += e.self_cpu_time_total
            if first_aten_parent is None:
                top_inside[e.name] += 1
    per = steps * n_norms
    step_us = sum(all_self_us.values()) / steps
    return {
        "n_norms": n_norms,
        "per_layer_count": {k: v / per for k, v in inside_count.items()},
        "per_layer_top_count": {k: v / per for k, v in top_inside.items()},
        "per_layer_self_us": {k: v / per for k, v in inside_self_us.items()},
        "norm_forward_us_per_layer": norm_total_us / per,
        "step_self_us": step_us,
        "step_count": {k: v / steps for k, v in all_count.items()},
        "step_self_us_by_op": {k: v / steps for k, v in all_self_us.items()},
        "backward_nodes": {k: v / steps for k, v in backward_nodes.items()},
        "phases": phase_table(events, steps, n_norms) if phases else {},
    }


def _top(d: dict, n: int) -> list[tuple[str, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])[:n]


def report(args) -> str:
    base = profile("bn", args.batch, args.window, args.steps, args.seed)
    var = profile(args.variant, args.batch, args.window, args.steps, args.seed, phases=args.phases)
    lines = [
        f"# Profile of {args.variant} vs BatchNorm: ResNet-20, batch {args.batch}, window "
        f"{args.window}, {args.threads} thread(s), {args.steps} profiled steps",
        "",
        f"Command: `PYTHONPATH=src:. python -m benchmarks.profile_cbn {' '.join(args.argv)}`",
        "",
        f"Norm layers: {var['n_norms']}. Whole-step self CPU (sum of aten self times, profiler "
        f"overhead included): BN {base['step_self_us'] / 1e3:.2f} ms, {args.variant} "
        f"{var['step_self_us'] / 1e3:.2f} ms. Norm forward (inclusive) per layer: BN "
        f"{base['norm_forward_us_per_layer']:.0f} us, {args.variant} "
        f"{var['norm_forward_us_per_layer']:.0f} us.",
        "",
        f"Aten ops per norm-layer forward: BN {sum(base['per_layer_count'].values()):.1f} "
        f"({sum(base['per_layer_top_count'].values()):.1f} top-level), {args.variant} "
        f"{sum(var['per_layer_count'].values()):.1f} ({sum(var['per_layer_top_count'].values()):.1f} "
        "top-level).",
        "",
        f"## {args.variant}: ops inside one norm-layer forward, by count (per layer, per step)",
        "",
        "| op | count (all) | top-level | self CPU us |",
        "|---|---|---|---|",
    ]
    for name, count in _top(var["per_layer_count"], args.top):
        lines.append(f"| {name} | {count:.2f} | {var['per_layer_top_count'].get(name, 0):.2f} | "
                     f"{var['per_layer_self_us'].get(name, 0):.1f} |")
    lines += [
        "",
        f"## {args.variant}: ops inside one norm-layer forward, by self CPU time (per layer, per step)",
        "",
        "| op | self CPU us | count |",
        "|---|---|---|",
    ]
    for name, us in _top(var["per_layer_self_us"], args.top):
        lines.append(f"| {name} | {us:.1f} | {var['per_layer_count'].get(name, 0):.2f} |")
    if var["phases"]:
        lines += [
            "",
            f"## {args.variant}: time by internal step (inclusive, per layer and step; nested steps "
            "are also counted in their caller)",
            "",
            "| step | calls | CPU us (inclusive) | aten ops directly inside |",
            "|---|---|---|---|",
        ]
        for name, row in sorted(var["phases"].items(), key=lambda kv: -kv[1]["cpu_us"]):
            lines.append(f"| {name} | {row['calls']:.2f} | {row['cpu_us']:.0f} | {row['aten_ops']:.1f} |")
    diff_nodes = {k: v - base["backward_nodes"].get(k, 0) for k, v in var["backward_nodes"].items()}
    lines += [
        "",
        f"## Autograd nodes evaluated per step (backward and any autograd.grad), {args.variant} minus BN",
        "",
        f"BN {sum(base['backward_nodes'].values()):.0f} nodes, {args.variant} "
        f"{sum(var['backward_nodes'].values()):.0f}.",
        "",
        "| node | extra per step |",
        "|---|---|",
    ]
    for name, extra in _top(diff_nodes, args.top):
        if extra > 0:
            lines.append(f"| {name} | {extra:.0f} |")
    diff_count = {k: v - base["step_count"].get(k, 0) for k, v in var["step_count"].items()}
    diff_us = {k: v - base["step_self_us_by_op"].get(k, 0) for k, v in var["step_self_us_by_op"].items()}
    lines += [
        "",
        f"## Whole step, {args.variant} minus BN, by op (per step)",
        "",
        "| op | extra count | extra self CPU us |",
        "|---|---|---|",
    ]
    for name, extra in _top(diff_us, args.top):
        lines.append(f"| {name} | {diff_count.get(name, 0):.0f} | {extra:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_cbn", description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="cbn", choices=["cbn", "cbn-diff", "naive", "authors", "floor"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", action="store_true",
                   help="also time the CBN layer's internal steps (record_function wrappers)")
    p.add_argument("--md", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    text = report(args)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    return text


if __name__ == "__main__":
    main()
