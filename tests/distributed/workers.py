"""Code run inside the spawned ranks of the distributed tests.

Each scenario measures errors against an independent single-process reference and returns
numbers; the tests assert on them in the parent process. Nothing here asserts between collectives,
so a wrong result cannot leave the other rank waiting in a collective.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import cbn

BATCH = (2, 3)  # rank r holds BATCH[r] examples: unequal counts exercise the pooling weights


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.double()


def _data(step, world_size):
    generator = torch.Generator().manual_seed(100 + step)
    xs = [torch.randn(BATCH[r], 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1 for r in range(world_size)]
    projections = [torch.randn(BATCH[r], 2, 5, 5, generator=generator, dtype=torch.float64) for r in range(world_size)]
    return xs, projections


def _max_error(a, b):
    return float((a - b).abs().max())


def _rows(rank):
    start = sum(BATCH[:rank])
    return slice(start, start + BATCH[rank])


def cross_process_equals_concatenated_batch(rank, world_size, window, steps=4):
    """DDP + process_group on P ranks == one process on the concatenated batch (loss summed)."""
    reference = _model()
    if window == 1:
        reference_norm = reference[1]  # nn.BatchNorm2d itself: SyncBatchNorm's definition
    else:
        reference = cbn.convert_model(reference, window=window)
        reference_norm = reference[1]
    model = cbn.convert_model(_model(), window=window, process_group=dist.group.WORLD)
    ddp = DDP(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9)
    errors = dict(output=0.0, input_grad=0.0, param_grad=0.0, running=0.0, window=0.0)
    for step in range(steps):
        xs, projections = _data(step, world_size)
        x = xs[rank].clone().requires_grad_()
        out = ddp(x)
        (out * projections[rank]).sum().backward()

        x_cat = torch.cat(xs).requires_grad_()
        out_cat = reference(x_cat)
        # DDP averages the ranks' gradients: the reference loss is the mean of the ranks' losses.
        ((out_cat * torch.cat(projections)).sum() / world_size).backward()
        errors["output"] = max(errors["output"], _max_error(out, out_cat[_rows(rank)]))
        errors["input_grad"] = max(errors["input_grad"], _max_error(x.grad, x_cat.grad[_rows(rank)] * world_size))
        for p, q in zip(model.parameters(), reference.parameters()):
            errors["param_grad"] = max(errors["param_grad"], _max_error(p.grad, q.grad))
        for name in ("running_mean", "running_var"):
            errors["running"] = max(errors["running"], _max_error(getattr(model[1], name), getattr(reference_norm, name)))
        if window > 1:
            ours, theirs = model[1].window_state.positions[0], reference_norm.window_state.positions[0]
            for name in ("stats", "mean_grad", "var_grad"):
                errors["window"] = max(errors["window"], _max_error(getattr(ours, name), getattr(theirs, name)))
        optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    errors["iterations"] = model[1].iterations
    return errors


def ddp_keeps_rank_local_windows(rank, world_size, window=3, steps=4, submodule=False):
    """DDP with broadcast_buffers=True (default) and no process_group: windows stay per rank.
    ``submodule``: the converted model is a submodule of the module DDP wraps (nothing on the
    root tells DDP about it)."""
    model = cbn.convert_model(_model(), window=window)
    ddp = DDP(nn.Sequential(model) if submodule else model)  # default arguments, broadcast_buffers=True
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    norm, conv = model[1], model[0]
    seen = {}

    def record(module, args):  # runs after DDP's buffer broadcast, before the layer's forward
        seen["running_mean"] = module.running_mean.clone()
        seen["window"] = module.window_statistics()["mean"].clone()

    norm.register_forward_pre_hook(record)
    expected_means, window_errors, running_spread, window_spread = [], 0.0, 0.0, 0.0
    for step in range(steps + 1):
        xs, projections = _data(step, world_size)
        with torch.no_grad():  # this rank's own batch statistics, independently of the layer
            expected_means.append(nn.functional.conv2d(xs[rank], conv.weight, conv.bias, padding=1).mean((0, 2, 3)))
        out = ddp(xs[rank])
        newest_first = torch.stack(expected_means[-2::-1][: window - 1]) if step else None
        if step:
            window_errors = max(window_errors, _max_error(seen["window"], newest_first))
        gathered = [torch.zeros_like(seen["running_mean"]) for _ in range(world_size)]
        dist.all_gather(gathered, seen["running_mean"])
        running_spread = max(running_spread, _max_error(gathered[0], gathered[1]))
        if step == steps:
            gathered = [torch.zeros_like(norm.window_state.positions[0].stats) for _ in range(world_size)]
            dist.all_gather(gathered, norm.window_state.positions[0].stats.contiguous())
            window_spread = _max_error(gathered[0], gathered[1])
        if step < steps:
            (out * projections[rank]).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    weights = [torch.zeros_like(conv.weight) for _ in range(world_size)]
    dist.all_gather(weights, conv.weight.detach().contiguous())
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    return dict(
        window_vs_own_batches=window_errors,
        running_spread_across_ranks=running_spread,
        window_spread_across_ranks=window_spread,
        weight_spread_across_ranks=_max_error(weights[0], weights[1]),
        iterations=norm.iterations,
        ignored_parameters=sorted(n for n, _ in model.named_parameters() if n in ignored),
        ignored_running=sorted(n for n in ignored if "running" in n or "batches" in n),
        ignored=sorted(ignored),
    )


def run_all(rank, world_size, out_dir):
    """Entry point for ``cbn.distributed.launch``: every scenario, results to ``out_dir/rank.json``."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results = {
        "sync_window1": cross_process_equals_concatenated_batch(rank, world_size, window=1),
        "sync_window3": cross_process_equals_concatenated_batch(rank, world_size, window=3),
        "ddp_local": ddp_keeps_rank_local_windows(rank, world_size),
        "ddp_submodule": ddp_keeps_rank_local_windows(rank, world_size, submodule=True),
    }
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(results, f)


# ----------------------------------------------------------------------------- exact resume
RESUME = dict(window=3, burnin=4, lr=0.1, momentum=0.9)


def resume_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    model = cbn.convert_model(model, window=RESUME["window"], burnin=RESUME["burnin"])
    optimizer = torch.optim.SGD(model.parameters(), lr=RESUME["lr"], momentum=RESUME["momentum"])
    return model, optimizer


def resume_train(model, optimizer, steps):
    """Train on the batches of the given step indices; the data depend on the index only."""
    losses = []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(2, 3, 6, 6, generator=generator)
        y = torch.randint(0, 5, (2,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def resume_in_fresh_process(rank, world_size, checkpoint, steps, out_path):
    """Entry point for ``cbn.distributed.launch``: load a checkpoint in a fresh model, continue."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, optimizer = resume_model(seed=1234)  # other initial weights: all must come from the file
    state = torch.load(checkpoint)
    model.load_state_dict(state["model"])
    cbn.load_window_state_dict(model, state["windows"])
    optimizer.load_state_dict(state["optimizer"])
    torch.save(resume_train(model, optimizer, steps), out_path)


# ----------------------------------------------------------------------------- FSDP2
def _fsdp_model():
    torch.manual_seed(0)

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), cbn.CrossIterationBatchNorm2d(c_out, window=3, burnin=2),
                             nn.ReLU())

    return nn.Sequential(block(3, 8), block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def fsdp_against_ddp(rank, world_size, out_dir, steps=6):
    """The same data through DDP, FSDP2 with the whole model as one unit, and FSDP2 with one unit
    per block (a convolution and its norm); layers built directly (no converter)."""
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results = {}
    for mode in ("ddp", "fsdp", "fsdp_blocks"):
        model = _fsdp_model()
        if mode == "ddp":
            wrapped = DDP(model)
        else:
            if mode == "fsdp_blocks":
                for block in (model[0], model[1]):
                    fully_shard(block)
            fully_shard(model)
            wrapped = model
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
        pooled_from = []
        for step in range(steps):
            generator = torch.Generator().manual_seed(100 * step + rank)
            wrapped(torch.randn(2, 3, 6, 6, generator=generator)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            pooled_from.append(model[0][1].window_state.positions[0].has_entries())
        parameters = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).tolist()
                      for name, p in model.named_parameters()}
        results[mode] = dict(parameters=parameters, iterations=[model[i][1].iterations for i in (0, 1)],
                             compensated=[row.compensated for row in cbn.pairing_report(model)],
                             window_bytes=sum(model[i][1].window_state.nbytes() for i in (0, 1)))
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(results, f)


def abort_natively(rank, world_size):
    """Stands for a native abort (a C++ exception escaping a transport thread): no Python error file."""
    os.abort()
