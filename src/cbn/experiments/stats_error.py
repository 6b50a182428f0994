"""How good are the compensated statistics? (``cbn stats-error``)

A real CBN training run at a small batch size records, for every training forward, its input
batch, the parameters it used (a snapshot taken just before it) and, per CBN layer, the pooled
statistics (mean, biased variance) the layer normalized with: the ``stats.mean`` / ``stats.var``
of its training forward (the window estimate, or the batch's own statistics during burn-in),
captured by :class:`NormStatisticsRecorder` without recomputing anything. The last ``k - 1`` are
kept. At chosen iterations t (after the optimizer step of t-1, i.e. under the weights W_t that
iteration t will use), for each past offset tau = 1..k-1 and each CBN layer l:

1. Truth. The past batch x_{t-tau} is re-run, without gradient, through a copy of the network
   with the CURRENT weights W_t (every layer, the norms' affine parameters included) in which
   every norm layer normalizes with exactly the pooled (mean, var) it used at iteration t-tau,
   when that batch was trained on. The truth is the per-channel mean and biased variance of
   layer l's input in that pass: the statistics the batch would have at layer l if only the
   weights had moved since. With unchanged weights (learning rate 0) it is the stored entry
   itself, so truth - stored is caused only by weight changes: layer l's own producer and every
   layer upstream of it.
2. Estimates. Each CBN layer's ``window_statistics()`` gives the stored ("naive") entries and the
   Taylor-moved ("compensated") ones, newest first.
3. Relative error ``||estimate - truth||_2 / ||truth||_2`` over channels, for the mean and for the
   variance.

Weight-change-only comparison (``*_w``; needs the parameter snapshots): the same two estimates
against the statistics of layer l's producer applied with its current weights W_t^l to its input
exactly as it was at iteration t-tau (x_{t-tau} replayed with the weights and the normalizers of
iteration t-tau). The layer's input is held fixed and only its own producer's weights move: the
change the Taylor step models. The mean is linear in those weights, so its compensated error is
zero up to rounding; the variance's is the second-order term of ``docs/method.md``. The difference
between the plain and the weight-change-only truth is the effect of the upstream weights, which
CBN's truncated Taylor step ignores. The same replay checks the machinery: with the weights of
t-tau it must reproduce the stored entry (``replay_mean``, ``replay_var``: relative deviations,
rounding level).

Truncation check: for a few layers l, on a small batch, the Frobenius norms of the Jacobians
d mu_l / d W_j and d sigma^2_l / d W_j for the producing convolution j = l and the two convolutions
executed just before it (l-1, l-2), with autograd (every norm normalizing with its batch's own
statistics, BatchNorm semantics). CBN keeps only the j = l term.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOTE = (
    "truth = per-channel mean and biased variance of the layer's input when the past batch x_{t-tau} is "
    "re-run through the network with the current weights W_t (all layers, the norms' gamma and beta "
    "included), every norm layer normalizing "
    "with exactly the pooled (mean, var) it used at iteration t-tau; with unchanged weights this is the "
    "stored entry, so truth - stored comes only from weight changes (the layer's own producer and upstream)"
)
NOTE_WEIGHT_CHANGE = (
    "the truth is the statistics of the layer's producer applied with its current weights to its "
    "input exactly as it was at iteration t-tau (layer input held fixed, only the layer's own producer "
    "weights move: what the Taylor step models; the mean is linear in them, so its compensated error is "
    "rounding only)"
)
_OLD_NOTE_WEIGHT_CHANGE = (
    "the same truth against each past batch's statistics under its own (old) weights with BatchNorm "
    "semantics, without (naive) and with (compensated) the layer's Taylor shift taken from "
    "window_statistics()"
)



def producer_module(model: nn.Module, layer) -> nn.Module | None:
    """The module of ``model`` whose weight compensated ``layer``'s latest training forward."""
    compensated, parameters, _ = layer.pairing_status()
    if not parameters:
        return None
    return next((m for m in model.modules() if getattr(m, "weight", None) is parameters[0]), None)

def _reduction_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel biased ``(var, mean)`` of ``x``, in float64."""
    return torch.var_mean(x.double(), _reduction_dims(x), correction=0)


class _Probe(nn.Module):
    """Stand-in for a norm layer: BatchNorm with the batch's own statistics; records them.

    Used by the truncation check only.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.var, self.mean = torch.var_mean(x, _reduction_dims(x), correction=0)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _Replay(nn.Module):
    """Stand-in for a CBN layer: normalizes with given statistics (``use``); records its input's.

    ``use`` is the pooled ``(mean, var)`` the layer used in a training forward; normalizing with
    it is that forward's normalization (eval-mode BatchNorm with those statistics, eps inside the
    square root). ``mean``/``var`` receive the input's per-channel statistics (float64).
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps
        self.use: tuple[Tensor, Tensor] | None = None
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.use is None:
            raise RuntimeError("_Replay: no normalization statistics given")
        self.var, self.mean = _var_mean(x)
        mean, var = self.use
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), self.weight, self.bias, False, 0.0, self.eps)


def _cbn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from cbn.layers.cross_iteration_batchnorm import _CrossIterationBatchNorm

    return [(n, m) for n, m in model.named_modules() if isinstance(m, _CrossIterationBatchNorm)]


class NormStatisticsRecorder:
    """Records the pooled ``(mean, var)`` each CBN layer of ``model`` normalizes with in training.

    A context manager. While active, the normalization function the layers call
    (``cross_iteration_batch_norm`` in :mod:`cbn.layers.cross_iteration_batchnorm`) is wrapped so
    that the statistics it returns and the layer normalizes with (``stats.mean``, ``stats.var``)
    are kept as detached copies; forward pre-hooks on the layers tell the wrapper which layer is
    running. Nothing is recomputed and the library is not modified; on exit the function is
    restored and the hooks removed. After each training forward, :meth:`take` returns the
    statistics per layer name and clears them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = _cbn_layers(model)
        self.latest: dict[str, tuple[Tensor, Tensor]] = {}
        self._current: str | None = None
        self._handles: list = []
        self._module = None
        self._original = None

    def __enter__(self) -> "NormStatisticsRecorder":
        from cbn.layers import cross_iteration_batchnorm as module

        original = getattr(module, "cross_iteration_batch_norm", None)
        if original is None:
            raise RuntimeError(
                "cbn.layers.cross_iteration_batchnorm no longer calls cross_iteration_batch_norm: "
                "update NormStatisticsRecorder"
            )

        def recording(*args, **kwargs):
            output, stats = original(*args, **kwargs)
            if self._current is not None:
                self.latest[self._current] = (stats.mean.detach().clone(), stats.var.detach().clone())
            return output, stats

        self._module, self._original = module, original
        module.cross_iteration_batch_norm = recording
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(_CurrentLayer(self, name)))
            self._handles.append(layer.register_forward_hook(_CurrentLayer(self, None), always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        if self._module is not None:
            self._module.cross_iteration_batch_norm = self._original
            self._module = self._original = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._current = None

    def take(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer name: the ``(mean, var)`` of the last training forward (then cleared)."""
        missing = [name for name, _ in self.layers if name not in self.latest]
        if missing:
            raise RuntimeError(
                f"no normalization statistics recorded for {', '.join(missing)} (not a single-process "
                "training forward?)"
            )
        taken, self.latest = self.latest, {}
        return taken


def _inert_hook(*args) -> None:
    return None


class _CurrentLayer:
    """Forward (pre-)hook of :class:`NormStatisticsRecorder`: sets the layer being run (``None``: none).

    A deep copy of the model (the study's replay copies) gets an inert hook instead: copies record
    nothing and share nothing with the recorder.
    """

    def __init__(self, recorder: NormStatisticsRecorder, name: str | None) -> None:
        self.recorder, self.name = recorder, name

    def __call__(self, module: nn.Module, *args) -> None:
        self.recorder._current = self.name

    def __deepcopy__(self, memo: dict):
        return _inert_hook


def probe_copy(model: nn.Module) -> tuple[nn.Module, dict[str, _Probe]]:
    """A deep copy of ``model`` whose norm layers are BatchNorm-semantics probes (truncation check)."""
    from cbn.convert import replace_batchnorm
    from cbn.layers.cross_iteration_batchnorm import _CrossIterationBatchNorm
    from torch.nn.modules.batchnorm import _BatchNorm

    clone = copy.deepcopy(model)
    clone = replace_batchnorm(clone, _Probe, (_CrossIterationBatchNorm, _BatchNorm))
    probes = {n: m for n, m in clone.named_modules() if isinstance(m, _Probe)}
    return clone, probes


def replay_copy(model: nn.Module) -> tuple[nn.Module, dict[str, _Replay]]:
    """A deep copy of ``model`` whose CBN layers are :class:`_Replay` (sharing nothing with ``model``)."""
    from cbn.convert import replace_batchnorm
    from cbn.layers.cross_iteration_batchnorm import _CrossIterationBatchNorm

    clone = copy.deepcopy(model)
    clone = replace_batchnorm(clone, _Replay, (_CrossIterationBatchNorm,))
    replays = {n: m for n, m in clone.named_modules() if isinstance(m, _Replay)}
    return clone, replays


class _OwnWeightStatistics:
    """Forward hook on a producer of the replay copy: statistics of its output with other weights.

    Applies the module to the same input with ``weights`` (the original model's current producer
    parameters) and stores the per-channel ``(var, mean)`` of that output in ``sink[name]``.
    """

    def __init__(self, sink: dict, name: str, weights: dict[str, Tensor]) -> None:
        self.sink, self.name, self.weights = sink, name, weights
        self.busy = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.busy:  # the functional call below runs this hook again
            return
        self.busy = True
        try:
            moved = torch.func.functional_call(module, self.weights, args, kwargs)
        finally:
            self.busy = False
        self.sink[self.name] = _var_mean(moved)


@torch.no_grad()
def replay(
    model: nn.Module,
    batches: list[Tensor],
    norm_statistics: list[dict[str, tuple[Tensor, Tensor]]],
    params: list[dict[str, Tensor]] | None = None,
    own_weights: bool = False,
) -> list[dict[str, dict[str, Tensor]]]:
    """Re-run ``batches`` with every CBN layer normalizing with the given statistics.

    Args:
        model: the converted model (not modified; a copy runs).
        batches: inputs.
        norm_statistics: per batch, per CBN layer name, the ``(mean, var)`` to normalize with
            (from :class:`NormStatisticsRecorder`).
        params: per batch, parameters to run it with (``named_parameters()`` names, all of
            them); ``None``: the model's current parameters.
        own_weights: also compute, per CBN layer with a producer, the statistics of the producer
            applied with the model's CURRENT producer weights to the producer input of this pass.

    Norm layers other than CBN layers (none in the study's models) run as they are.

    Returns:
        Per batch, per CBN layer name, float64 ``(C,)`` tensors ``mean`` and ``var`` of the layer's
        input, and with ``own_weights`` ``mean_own`` and ``var_own`` (equal to ``mean``/``var``
        for a layer without producer: it has no own weights).
    """
    clone, replays = replay_copy(model)
    clone.train()
    own: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    if own_weights:
        names = {id(m): n for n, m in model.named_modules()}
        clone_modules = dict(clone.named_modules())
        for name, layer in _cbn_layers(model):
            producer = producer_module(model, layer)
            if producer is None:
                continue
            weights = {k: p for k, p in (("weight", producer.weight), ("bias", producer.bias)) if p is not None}
            target = clone_modules[names[id(producer)]]
            handles.append(target.register_forward_hook(_OwnWeightStatistics(own, name, weights), with_kwargs=True))
    clone_params = dict(clone.named_parameters())
    out = []
    try:
        for i, x in enumerate(batches):
            if params is not None:
                missing = set(clone_params) - set(params[i])
                if missing:
                    raise ValueError(f"parameter snapshot {i} lacks {sorted(missing)}")
                for name, p in clone_params.items():
                    p.copy_(params[i][name])
            for name, module in replays.items():
                module.use = norm_statistics[i][name]
                module.mean = module.var = None
            own.clear()
            clone(x)
            entry = {}
            for name, module in replays.items():
                if module.mean is None:
                    raise RuntimeError(f"{name} was not reached in the replay")
                entry[name] = {"mean": module.mean, "var": module.var}
                if own_weights:
                    var, mean = own.get(name, (module.var, module.mean))
                    entry[name].update(mean_own=mean, var_own=var)
            out.append(entry)
    finally:
        for handle in handles:
            handle.remove()
    return out


def true_statistics(
    model: nn.Module, batches: list[Tensor], norm_statistics: list[dict[str, tuple[Tensor, Tensor]]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per CBN layer name: the truth ``(mean, var)``, each ``(len(batches), C)`` float64.

    The statistics of each layer's input when each batch runs through the model with its
    current weights, every CBN layer normalizing with that batch's ``norm_statistics`` entry
    (the pooled statistics it used when the batch was trained on).
    """
    runs = replay(model, batches, norm_statistics)
    names = [n for n, _ in _cbn_layers(model)]
    return {
        n: (torch.stack([r[n]["mean"] for r in runs]), torch.stack([r[n]["var"] for r in runs]))
        for n in names
    }


def relative_error(estimate: Tensor, truth: Tensor) -> float:
    return float((estimate.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-12))


def measure_errors(
    model: nn.Module,
    recent_inputs: list[Tensor],
    recent_norm_statistics: list[dict[str, tuple[Tensor, Tensor]]],
    recent_params: list[dict[str, Tensor]] | None = None,
) -> dict:
    """Errors of naive and compensated window statistics, per layer and offset.

    Args:
        model: the converted model, right before its next training forward (current weights).
        recent_inputs: the inputs of the previous training forwards, newest first.
        recent_norm_statistics: for the same forwards, per CBN layer, the pooled ``(mean, var)``
            it normalized with (:class:`NormStatisticsRecorder`), newest first.
        recent_params: optional parameter snapshots taken before those forwards (newest first).
            With them, each row also holds the weight-change-only errors (``*_naive_w``,
            ``*_compensated_w``: the estimates against the layer's producer applied with its
            current weights to its input as it was then) and the replay check (``replay_mean``,
            ``replay_var``: the stored entry against the replay with the old weights).

    Returns:
        Per CBN layer name, one row per offset tau (1 = newest) with relative errors
        ``mean_naive``, ``mean_compensated``, ``var_naive``, ``var_compensated`` against the
        truth of :func:`true_statistics`.
    """
    layers = _cbn_layers(model)
    windows = {n: m.window_statistics() for n, m in layers}
    depth = max((w["mean"].shape[0] for w in windows.values()), default=0)
    available = min(len(recent_inputs), len(recent_norm_statistics))
    if recent_params is not None:
        available = min(available, len(recent_params))
    if depth > available:
        raise ValueError(f"the windows hold {depth} past entries but only {available} past forwards were given")
    truth = true_statistics(model, recent_inputs[:depth], recent_norm_statistics[:depth])
    then = None
    if recent_params is not None:
        then = replay(model, recent_inputs[:depth], recent_norm_statistics[:depth], recent_params[:depth],
                      own_weights=True)
    out = {}
    for name, _ in layers:
        w = windows[name]
        t_mean, t_var = truth[name]
        rows = []
        for tau in range(1, w["mean"].shape[0] + 1):
            i = tau - 1
            row = {
                "tau": tau,
                "mean_naive": relative_error(w["mean"][i], t_mean[i]),
                "mean_compensated": relative_error(w["mean_compensated"][i], t_mean[i]),
                "var_naive": relative_error(w["var"][i], t_var[i]),
                "var_compensated": relative_error(w["var_compensated"][i], t_var[i]),
            }
            if then is not None:
                old = then[i][name]
                row.update(
                    mean_naive_w=relative_error(w["mean"][i], old["mean_own"]),
                    mean_compensated_w=relative_error(w["mean_compensated"][i], old["mean_own"]),
                    var_naive_w=relative_error(w["var"][i], old["var_own"]),
                    var_compensated_w=relative_error(w["var_compensated"][i], old["var_own"]),
                    replay_mean=relative_error(w["mean"][i], old["mean"]),
                    replay_var=relative_error(w["var"][i], old["var"]),
                )
            rows.append(row)
        out[name] = rows
    return out


def producer_order(model: nn.Module, x: Tensor) -> list[nn.Module]:
    """Convolutions / linear layers in execution order for input ``x``."""
    order: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: order.append(mod))
        for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def truncation_study(model: nn.Module, x: Tensor, layer_names: list[str], depth: int = 2) -> list[dict]:
    """Frobenius norms of d(mu_l, var_l)/d W_{l-r}, r = 0..depth, for the named CBN layers.

    W_l is the layer's producer; W_{l-1}, W_{l-2} the nearest convolutions run before it that the
    statistic depends on (a parallel shortcut branch is skipped).
    """
    clone, probes = probe_copy(model)
    clone.train()
    originals = dict(_cbn_layers(model))
    # map original producers to the clone's modules by name
    names_of = {id(m): n for n, m in model.named_modules()}
    clone_modules = dict(clone.named_modules())
    order = producer_order(clone, x)
    results = []
    for name in layer_names:
        producer = producer_module(model, originals[name])
        if producer is None:
            continue
        own = clone_modules[names_of[id(producer)]]
        position = next(i for i, m in enumerate(order) if m is own)
        # Candidates: the producer and every layer run before it; those the statistic does not
        # depend on (parallel branches) get no gradient and are skipped, so r counts upstream layers.
        candidates = [order[i] for i in range(position, -1, -1)]
        clone.zero_grad(set_to_none=True)
        clone(x)
        probe = probes[name]
        mean, var = probe.mean, probe.var
        params = [m.weight for m in candidates]
        squared = [{"mean": 0.0, "var": 0.0} for _ in candidates]
        used = [False] * len(candidates)
        for stat_name, stat in (("mean", mean), ("var", var)):
            for c in range(stat.shape[0]):
                grads = torch.autograd.grad(stat[c], params, retain_graph=True, allow_unused=True)
                for j, g in enumerate(grads):
                    if g is not None:
                        used[j] = True
                        squared[j][stat_name] += float(g.double().square().sum())
        upstream = [j for j in range(len(candidates)) if used[j] or j == 0][: depth + 1]
        targets = [(r, candidates[j]) for r, j in enumerate(upstream)]
        norms = {r: squared[j] for r, j in enumerate(upstream)}
        own_mean = math.sqrt(norms[0]["mean"])
        own_var = math.sqrt(norms[0]["var"])
        for r, module in targets:
            m_norm, v_norm = math.sqrt(norms[r]["mean"]), math.sqrt(norms[r]["var"])
            results.append({
                "layer": name, "r": r, "weight": [n for n, mm in clone_modules.items() if mm is module][0],
                "dmean_norm": m_norm, "dvar_norm": v_norm,
                "dmean_ratio": m_norm / own_mean if own_mean else float("nan"),
                "dvar_ratio": v_norm / own_var if own_var else float("nan"),
            })
    return results


# ----------------------------------------------------------------------------- the study
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["resnet20", "resnet8"], default="resnet20")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--burnin", type=int, default=150, help="CBN burn-in steps")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--at", type=int, nargs="+", default=[200, 300, 400, 500, 600],
                   help="iterations (1-based, before their forward) at which to measure; each needs "
                        "window - 1 earlier iterations")
    p.add_argument("--base-lr", type=float, default=0.1, help="lr at batch REF_BATCH (scaled linearly)")
    p.add_argument("--ref-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="explicit learning rate (overrides the linear scaling; 0 keeps the weights fixed)")
    p.add_argument("--min-lr", type=float, default=0.0, help="floor of the linearly scaled lr")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no crop/flip augmentation")
    p.add_argument("--train-subset", type=int, default=2400, help="class-balanced training subset (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trunc-layers", type=int, default=4,
                   help="layers for the truncated-derivative check (0: skip it)")
    p.add_argument("--trunc-batch", type=int, default=8)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/stats-error")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--report-only", action="store_true", help="re-render table and plot from OUT/stats_error.json")


def study_lr(args: argparse.Namespace) -> float:
    if args.lr is not None:
        return args.lr
    return max(args.base_lr * args.batch_size / args.ref_batch, args.min_lr)


def run_study(args: argparse.Namespace) -> dict:
    from cbn.experiments.data import FashionMNIST, train_batches
    from cbn.experiments.norms import build_model

    if args.batch_size < 1 or args.window < 1 or args.steps < 1:
        raise ValueError("--batch-size, --window and --steps must be >= 1")
    torch.set_num_threads(1)
    data = FashionMNIST.load(args.data_dir, args.train_subset, None, 0)
    lr = study_lr(args)
    torch.manual_seed(args.seed)
    model = build_model(args.model, "cbn", window=args.window, burnin=args.burnin)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    at = sorted(set(args.at))
    past = max(1, args.window - 1)
    unmeasurable = [t for t in at if t <= past or t > args.steps]
    if unmeasurable:
        print(f"note: no measurement at iterations {unmeasurable} (need {past} < t <= --steps {args.steps})",
              file=sys.stderr)
    if any(past < t <= args.burnin + args.window for t in at):
        print("note: measurements within burn-in + window see partly uncompensated windows", file=sys.stderr)
    recent: deque[Tensor] = deque(maxlen=past)
    recent_stats: deque[dict[str, tuple[Tensor, Tensor]]] = deque(maxlen=past)
    recent_params: deque[dict[str, Tensor]] = deque(maxlen=past)
    measurements = []
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="stats-error", file=sys.stderr)

    def batches():
        epoch = 0
        while True:
            yield from train_batches(data.train_images, data.train_labels, args.batch_size, args.seed, epoch,
                                     augmentation=getattr(args, "augment", True))
            epoch += 1

    t0 = time.perf_counter()
    measuring = 0.0
    with NormStatisticsRecorder(model) as recorder:
        for iteration, (x, y) in zip(range(1, args.steps + 1), batches()):
            if iteration in at and len(recent) == recent.maxlen:
                t1 = time.perf_counter()
                errors = measure_errors(model, list(recent), list(recent_stats), list(recent_params))
                measurements.append({"iteration": iteration, "layers": errors})
                measuring += time.perf_counter() - t1
            snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent.appendleft(x)
            recent_stats.appendleft(recorder.take())
            recent_params.appendleft(snapshot)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    truncation = []
    if args.trunc_layers > 0:
        layer_names = [n for n, _ in _cbn_layers(model)]
        first = min(2, len(layer_names) - 1)
        positions = torch.linspace(first, len(layer_names) - 1, args.trunc_layers).round().long().tolist()
        pick = [layer_names[i] for i in positions]
        x_small = next(iter(train_batches(data.train_images, data.train_labels, args.trunc_batch, args.seed + 1, 0)))[0]
        truncation = truncation_study(model, x_small, list(dict.fromkeys(pick)))
    return {
        "config": vars(args) | {"lr": lr},
        "note": NOTE,
        "note_weight_change": NOTE_WEIGHT_CHANGE,
        "seconds": time.perf_counter() - t0,
        "seconds_measuring": measuring,
        "measurements": measurements,
        "truncation": truncation,
        "summary": summarize(measurements),
    }


def summarize(measurements: list[dict]) -> list[dict]:
    """Per offset tau: errors averaged over layers and measurement iterations (and the ratios)."""
    by_tau: dict[int, dict[str, list[float]]] = {}
    for m in measurements:
        for rows in m["layers"].values():
            for row in rows:
                slot = by_tau.setdefault(row["tau"], {})
                for k, v in row.items():
                    if k != "tau":
                        slot.setdefault(k, []).append(v)
    out = []
    for tau in sorted(by_tau):
        entry = {"tau": tau, **{k: statistics.fmean(v) for k, v in by_tau[tau].items()}}
        entry["mean_ratio"] = entry["mean_naive"] / max(entry["mean_compensated"], 1e-300)
        entry["var_ratio"] = entry["var_naive"] / max(entry["var_compensated"], 1e-300)
        if "mean_naive_w" in entry:
            entry["mean_ratio_w"] = entry["mean_naive_w"] / max(entry["mean_compensated_w"], 1e-300)
            entry["var_ratio_w"] = entry["var_naive_w"] / max(entry["var_compensated_w"], 1e-300)
        out.append(entry)
    return out


def per_layer(measurements: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    table: dict[str, dict[int, dict[str, list[float]]]] = {}
    for m in measurements:
        for layer, rows in m["layers"].items():
            for row in rows:
                cell = table.setdefault(layer, {}).setdefault(row["tau"], {})
                for k, v in row.items():
                    if k != "tau":
                        cell.setdefault(k, []).append(v)
    return {l: {t: {k: statistics.fmean(v) for k, v in c.items()} for t, c in taus.items()} for l, taus in table.items()}


def _ratio(value: float) -> str:
    # compensated errors at rounding level (weight-change-only mean) make the ratio meaningless
    return f"{value:.1f}x" if value < 1000 else ">1000x"


def _error_table(summary: list[dict], suffix: str = "") -> list[str]:
    lines = [
        "| tau | mean naive | mean compensated | ratio | var naive | var compensated | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['tau']} | {e['mean_naive' + suffix]:.4f} | {e['mean_compensated' + suffix]:.4f} | "
            f"{_ratio(e['mean_ratio' + suffix])} | {e['var_naive' + suffix]:.4f} | "
            f"{e['var_compensated' + suffix]:.4f} | {_ratio(e['var_ratio' + suffix])} |"
        )
    return lines


def markdown(result: dict) -> str:
    cfg = result["config"]
    measurements = result["measurements"]
    layer_count = len(measurements[0]["layers"]) if measurements else 0
    iterations = ", ".join(str(m["iteration"]) for m in measurements) or "none"
    lines = [
        f"Statistics study: {cfg.get('model')}, batch {cfg.get('batch_size')}, window {cfg.get('window')}, "
        f"lr {cfg.get('lr'):.6g}, burn-in {cfg.get('burnin')}, {cfg.get('steps')} steps, training subset "
        f"{cfg.get('train_subset')}; measured before iterations {iterations} ({layer_count} CBN layers each).",
        "",
        f"{result['note'][:1].upper()}{result['note'][1:]}.",
        "",
        "Naive = the stored entry, compensated = the Taylor-moved entry (window_statistics()). Relative error "
        "||estimate - truth||_2 / ||truth||_2 over channels, for the statistics mean and variance, averaged over "
        "layers and measurement iterations; ratio = naive / compensated.",
        "",
        *_error_table(result["summary"]),
    ]
    weight_only = bool(result["summary"]) and "mean_naive_w" in result["summary"][0]
    if weight_only:
        note_w = result.get("note_weight_change", _OLD_NOTE_WEIGHT_CHANGE)
        lines += ["", f"Weight-change-only errors: {note_w}.", "", *_error_table(result["summary"], "_w")]
        replayed = [row for m in measurements for rows in m["layers"].values() for row in rows if "replay_mean" in row]
        if replayed:
            lines += [
                "",
                "Replay check (the past batches re-run with their own old weights and normalizers must reproduce "
                "the stored entries): largest relative deviation over layers, offsets and measurements: "
                f"mean {max(r['replay_mean'] for r in replayed):.2e}, "
                f"var {max(r['replay_var'] for r in replayed):.2e}.",
            ]
    layers = per_layer(measurements)
    if layers:
        taus = sorted({t for v in layers.values() for t in v})
        show = [t for t in taus if t in (1, 2, 4, 8) or t == taus[-1]]
        for suffix, title in (("", "plain"), ("_w", "weight-change-only"))[: 2 if weight_only else 1]:
            lines += ["", f"Per layer, {title} errors of the statistics mean and variance (naive / compensated):", "",
                      "| layer | " + " | ".join(f"mean tau {t}" for t in show) + " | "
                      + " | ".join(f"var tau {t}" for t in show) + " |",
                      "|---|" + "---|" * (2 * len(show))]
            for layer, cells in layers.items():
                cols = [
                    f"{cells[t][stat + '_naive' + suffix]:.3f} / {cells[t][stat + '_compensated' + suffix]:.3f}"
                    if t in cells else "-"
                    for stat in ("mean", "var") for t in show
                ]
                lines.append(f"| {layer} | " + " | ".join(cols) + " |")
    if result["truncation"]:
        lines += ["", "Truncated derivatives (BatchNorm semantics): ||d stat_l / d W_{l-r}||_F relative to r = 0 "
                  "(the layer's own producer):",
                  "", "| layer | r | weight | d mean (ratio) | d var (ratio) |", "|---|---|---|---|---|"]
        for t in result["truncation"]:
            lines.append(f"| {t['layer']} | {t['r']} | {t['weight']} | {t['dmean_norm']:.3g} ({t['dmean_ratio']:.3f}) | "
                         f"{t['dvar_norm']:.3g} ({t['dvar_ratio']:.3f}) |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    taus = [e["tau"] for e in s]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    weight_only = bool(s) and "mean_naive_w" in s[0]
    for ax, stat in zip(axes, ("mean", "var")):
        # log scale: rounding-level errors (learning rate 0) are shown at 1e-12
        ax.plot(taus, [max(e[f"{stat}_naive"], 1e-12) for e in s], "o-", color="C0", label="naive (stored)")
        ax.plot(taus, [max(e[f"{stat}_compensated"], 1e-12) for e in s], "D-", color="C1",
                label="compensated (Taylor)")
        if weight_only:
            ax.plot(taus, [max(e[f"{stat}_naive_w"], 1e-12) for e in s], "o--", color="C0", alpha=0.7,
                    label="naive, own weights only")
            ax.plot(taus, [max(e[f"{stat}_compensated_w"], 1e-12) for e in s], "D--", color="C1", alpha=0.7,
                    label="compensated, own weights only")
        ax.set_yscale("log")
        ax.set_xlabel("offset tau (iterations back)")
        ax.set_ylabel("relative error (mean over layers)")
        ax.set_title("mean" if stat == "mean" else "variance")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    cfg = result["config"]
    fig.suptitle(f"{cfg['model']}, batch {cfg['batch_size']}, window {cfg['window']}: error of past statistics")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out: Path, result: dict) -> str:
    """Write stats_error.md and stats_error.png for ``result`` into ``out``; returns the markdown."""
    text = markdown(result)
    (out / "stats_error.md").write_text(text + "\n")
    plot(result, out / "stats_error.png")
    return text


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.report_only:
        result = json.loads((out / "stats_error.json").read_text())
        print(render(out, result))
        print(f"plot: {out / 'stats_error.png'}")
        return 0
    result = run_study(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats_error.json").write_text(json.dumps(result, indent=2, default=float))
    print(render(out, result))
    print(f"plot: {out / 'stats_error.png'}")
    return 0
