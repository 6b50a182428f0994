"""How good are the compensated statistics? (``cbn stats-error``)

During a real CBN training run at a small batch size, at chosen iterations t (after the
optimizer step of t-1, i.e. under the weights W_t that iteration t will use):

1. Truth. The last k-1 input batches x_{t-1}, ..., x_{t-k+1} are kept. Each is re-run through
   a copy of the WHOLE network with the current weights, in a no-grad pass in which every norm
   layer normalizes with that batch's own statistics (BatchNorm semantics, no state touched);
   a probe records each norm's input mean and biased variance. These are the statistics the
   past batches would have under W_t.
2. Estimates. Each CBN layer's ``window_statistics()`` gives the stored ("naive") entries and
   the Taylor-moved ("compensated") ones, newest first (offset tau = 1, 2, ...).
3. Relative error per layer and offset: ``||estimate - truth||_2 / ||truth||_2`` over channels,
   for the mean and for the variance.

Truncation check: for a few layers l, on a small batch, the Frobenius norms of the Jacobians
d mu_l / d W_j and d sigma^2_l / d W_j for the producing convolution j = l and the two convolutions
executed just before it (l-1, l-2), with autograd (BatchNorm semantics as above). CBN keeps
only the j = l term.
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
    "truth = statistics of the stored batches re-run through the whole network with the current "
    "weights, every norm normalizing with the batch's own statistics"
)


class _Probe(nn.Module):
    """Stand-in for a norm layer: BatchNorm with the batch's own statistics; records them."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        self.var, self.mean = torch.var_mean(x, dims, correction=0)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _cbn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from cbn.layers.cross_iteration_batchnorm import _CrossIterationBatchNorm

    return [(n, m) for n, m in model.named_modules() if isinstance(m, _CrossIterationBatchNorm)]


def probe_copy(model: nn.Module) -> tuple[nn.Module, dict[str, _Probe]]:
    """A deep copy of ``model`` whose norm layers are probes (sharing nothing with ``model``)."""
    from cbn.convert import replace_batchnorm
    from cbn.layers.cross_iteration_batchnorm import _CrossIterationBatchNorm
    from torch.nn.modules.batchnorm import _BatchNorm

    clone = copy.deepcopy(model)
    clone = replace_batchnorm(clone, _Probe, (_CrossIterationBatchNorm, _BatchNorm))
    probes = {n: m for n, m in clone.named_modules() if isinstance(m, _Probe)}
    return clone, probes


@torch.no_grad()
def true_statistics(model: nn.Module, batches: list[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per norm layer name: (mean, var) of shape (len(batches), C) under the model's current weights."""
    clone, probes = probe_copy(model)
    clone.train()
    means = {n: [] for n in probes}
    variances = {n: [] for n in probes}
    for x in batches:
        clone(x)
        for name, probe in probes.items():
            means[name].append(probe.mean.double())
            variances[name].append(probe.var.double())
    return {n: (torch.stack(means[n]), torch.stack(variances[n])) for n in probes}


def relative_error(estimate: Tensor, truth: Tensor) -> float:
    return float((estimate.double() - truth).norm() / truth.norm().clamp_min(1e-12))


@torch.no_grad()
def statistics_under(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per norm layer: (mean, var) of its input for batch ``x`` with the parameters ``params``."""
    clone, probes = probe_copy(model)
    own = dict(clone.named_parameters())
    for name, value in params.items():
        own[name].copy_(value)
    clone.train()
    clone(x)
    return {n: (p.mean.double(), p.var.double()) for n, p in probes.items()}


def measure_errors(
    model: nn.Module, recent_inputs: list[Tensor], recent_params: list[dict[str, Tensor]] | None = None
) -> dict:
    """Errors of naive and compensated window statistics, per layer and offset.

    Args:
        model: the converted model, right before its next training forward.
        recent_inputs: the inputs of the previous training forwards, newest first.
        recent_params: optional parameter snapshots taken at those forwards (newest first). With
            them, each row also holds the weight-change-only errors (``*_naive_w``,
            ``*_compensated_w``): the same truth against the batch's BatchNorm-semantics
            statistics under its old weights, without and with the layer's Taylor shift
            (compensated - stored, from ``window_statistics()``). These isolate what the Taylor
            step addresses; the plain errors also include the difference between the
            normalizers the layers used in training (cross-iteration) and BatchNorm semantics.
    """
    layers = _cbn_layers(model)
    windows = {n: m.window_statistics() for n, m in layers}
    depth = max((w["mean"].shape[0] for w in windows.values()), default=0)
    truth = true_statistics(model, recent_inputs[:depth])
    then = None
    if recent_params is not None:
        then = [statistics_under(model, recent_params[i], recent_inputs[i]) for i in range(depth)]
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
                old_mean, old_var = then[i][name]
                shift_mean = w["mean_compensated"][i].double() - w["mean"][i].double()
                shift_var = w["var_compensated"][i].double() - w["var"][i].double()
                row.update(
                    mean_naive_w=relative_error(old_mean, t_mean[i]),
                    mean_compensated_w=relative_error(old_mean + shift_mean, t_mean[i]),
                    var_naive_w=relative_error(old_var, t_var[i]),
                    var_compensated_w=relative_error((old_var + shift_var).clamp_min(0), t_var[i]),
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
        producer = originals[name].producer
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
                   help="iterations (1-based, before their forward) at which to measure")
    p.add_argument("--base-lr", type=float, default=0.1, help="lr at batch 32 (scaled linearly)")
    p.add_argument("--ref-batch", type=int, default=32)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--train-subset", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trunc-layers", type=int, default=4, help="layers for the truncated-derivative check")
    p.add_argument("--trunc-batch", type=int, default=8)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/stats-error")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--report-only", action="store_true", help="re-render table and plot from OUT/stats_error.json")


def run_study(args: argparse.Namespace) -> dict:
    from cbn.experiments.data import FashionMNIST, train_batches
    from cbn.experiments.norms import build_model

    torch.set_num_threads(1)
    data = FashionMNIST.load(args.data_dir, args.train_subset, None, 0)
    lr = args.base_lr * args.batch_size / args.ref_batch
    torch.manual_seed(args.seed)
    model = build_model(args.model, "cbn", window=args.window, burnin=args.burnin)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    at = sorted(set(args.at))
    if any(t <= args.burnin + args.window for t in at):
        print("note: measurements within burn-in + window see partly uncompensated windows", file=sys.stderr)
    recent: deque[Tensor] = deque(maxlen=max(1, args.window - 1))
    recent_params: deque[dict[str, Tensor]] = deque(maxlen=max(1, args.window - 1))
    measurements = []
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="stats-error", file=sys.stderr)

    def batches():
        epoch = 0
        while True:
            yield from train_batches(data.train_images, data.train_labels, args.batch_size, args.seed, epoch)
            epoch += 1

    t0 = time.perf_counter()
    for iteration, (x, y) in zip(range(1, args.steps + 1), batches()):
        if iteration in at and len(recent) == recent.maxlen:
            errors = measure_errors(model, list(recent), list(recent_params))
            measurements.append({"iteration": iteration, "layers": errors})
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.appendleft(x)
        recent_params.appendleft(snapshot)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    layer_names = [n for n, _ in _cbn_layers(model)]
    pick = [layer_names[i] for i in torch.linspace(2, len(layer_names) - 1, args.trunc_layers).round().long().tolist()]
    x_small = next(iter(train_batches(data.train_images, data.train_labels, args.trunc_batch, args.seed + 1, 0)))[0]
    truncation = truncation_study(model, x_small, list(dict.fromkeys(pick)))
    return {
        "config": vars(args) | {"lr": lr},
        "note": NOTE,
        "seconds": time.perf_counter() - t0,
        "measurements": measurements,
        "truncation": truncation,
        "summary": summarize(measurements),
    }


def summarize(measurements: list[dict]) -> list[dict]:
    """Per offset tau: errors averaged over layers and measurement iterations (and the ratio)."""
    by_tau: dict[int, dict[str, list[float]]] = {}
    for m in measurements:
        for rows in m["layers"].values():
            for row in rows:
                slot = by_tau.setdefault(row["tau"], {k: [] for k in row if k != "tau"})
                for k, v in row.items():
                    if k != "tau":
                        slot[k].append(v)
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


def markdown(result: dict) -> str:
    lines = [
        f"Relative error ||estimate - truth|| / ||truth|| of past statistics ({result['note']}), averaged over "
        f"{len(next(iter(result['measurements']))['layers']) if result['measurements'] else 0} CBN layers and "
        f"{len(result['measurements'])} measurement iterations.",
        "",
        "| tau | mean naive | mean compensated | ratio | var naive | var compensated | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in result["summary"]:
        lines.append(
            f"| {e['tau']} | {e['mean_naive']:.4f} | {e['mean_compensated']:.4f} | {e['mean_ratio']:.1f}x | "
            f"{e['var_naive']:.4f} | {e['var_compensated']:.4f} | {e['var_ratio']:.1f}x |"
        )
    if result["summary"] and "mean_naive_w" in result["summary"][0]:
        lines += [
            "",
            "Weight-change-only errors: the same truth against each past batch's statistics under its own "
            "(old) weights with BatchNorm semantics, without (naive) and with (compensated) the layer's Taylor "
            "shift taken from window_statistics(). This isolates what the Taylor step addresses.",
            "",
            "| tau | mean naive | mean compensated | ratio | var naive | var compensated | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in result["summary"]:
            lines.append(
                f"| {e['tau']} | {e['mean_naive_w']:.4f} | {e['mean_compensated_w']:.4f} | {e['mean_ratio_w']:.1f}x | "
                f"{e['var_naive_w']:.4f} | {e['var_compensated_w']:.4f} | {e['var_ratio_w']:.1f}x |"
            )
    layers = per_layer(result["measurements"])
    if layers:
        taus = sorted({t for v in layers.values() for t in v})
        show = [t for t in taus if t in (1, 2, 4) or t == taus[-1]]
        weight_only = "var_naive_w" in next(iter(next(iter(layers.values())).values()))
        for key, title in (("var", "plain"), ("var_w", "weight-change-only")) if weight_only else (("var", "plain"),):
            naive_key = key.replace("var", "var_naive")
            comp_key = key.replace("var", "var_compensated")
            mean_naive_key = naive_key.replace("var", "mean")
            mean_comp_key = comp_key.replace("var", "mean")
            lines += ["", f"Per layer, {title} errors, mean and variance (naive / compensated):", "",
                      "| layer | " + " | ".join(f"mean tau {t}" for t in show) + " | "
                      + " | ".join(f"var tau {t}" for t in show) + " |",
                      "|---|" + "---|" * (2 * len(show))]
            for layer, cells in layers.items():
                mean_cells = [f"{cells[t][mean_naive_key]:.3f} / {cells[t][mean_comp_key]:.3f}" if t in cells else "-"
                              for t in show]
                var_cells = [f"{cells[t][naive_key]:.3f} / {cells[t][comp_key]:.3f}" if t in cells else "-"
                             for t in show]
                lines.append(f"| {layer} | " + " | ".join(mean_cells + var_cells) + " |")
    if result["truncation"]:
        lines += ["", "Truncated derivatives: ||d stat_l / d W_{l-r}||_F relative to r = 0 (the layer's own producer):",
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
        ax.plot(taus, [e[f"{stat}_naive"] for e in s], "o-", color="C0", label="naive (stored)")
        ax.plot(taus, [e[f"{stat}_compensated"] for e in s], "D-", color="C1", label="compensated (Taylor)")
        if weight_only:
            ax.plot(taus, [e[f"{stat}_naive_w"] for e in s], "o--", color="C0", alpha=0.7,
                    label="naive, weight change only")
            ax.plot(taus, [e[f"{stat}_compensated_w"] for e in s], "D--", color="C1", alpha=0.7,
                    label="compensated, weight change only")
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

