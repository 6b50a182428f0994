"""Fine-tuning a BatchNorm-pretrained backbone at 1-2 images per step (issue 28): CBN's home regime.

Two steps, each resumable and recorded:

1. **Pretraining** (the stand-in for ImageNet pretraining), once: the encoder of the dense task's
   FCN (:class:`cbn.experiments.segmentation.FCN`, widths 8-128) with BatchNorm, a global average
   pool and a linear classifier, trained on Fashion-MNIST classification (all 60,000 training
   images, padded to 32x32) at a large batch. The encoder's weights (conv weights, BN affine and
   running statistics) are saved with a record (config, commit, accuracy, sha256 of the weights).
2. **Fine-tuning** the whole FCN on the dense task (composed scenes with per-scene photometry, the
   protocol of :mod:`cbn.experiments.segmentation`) from those weights, with each method's norms:

   ==================  =======================================================================
   ``frozen-bn``       BN layers with fixed running statistics, affine trained (the statistics
                       of torchvision's ``FrozenBatchNorm2d``; see :class:`FrozenBatchNorm2d`)
   ``bn``              BatchNorm, trained as usual from the pretrained statistics
   ``cbn``, ``cbn-diff``, ``naive``   the pretrained BN model converted by ``cbn.convert_model``
   ``gn``              GroupNorm from scratch (no pretrained weight at all)
   ``gn-pretrained``   GroupNorm, the pretrained convolution weights, fresh GN affine
   ``mabn``            MABN (:mod:`cbn.experiments.mabn`): pretrained conv weights (centralized in
                       the forward) and BN affine
   ``brn``, ``syncbn`` Batch Renorm / SyncBN with the pretrained BN state
   ==================  =======================================================================

   The score heads (1x1 convolutions) are always new, initialized by the run's seed (the same for
   every method).

Commands (from the repository root)::

    python -m cbn.experiments.finetune pretrain                      # once: docs/data/finetune/pretrained/
    python -m cbn.experiments.finetune run --methods bn cbn-diff --batch-sizes 2 --seeds 0 1
    python -m cbn.experiments.finetune summary
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUT = "docs/data/finetune"
PRETRAINED = f"{OUT}/pretrained/fcn-encoder.pt"  # relative to the repository root (the working directory)


# ----------------------------------------------------------------------------- frozen BN


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``
    in training and evaluation alike; the running statistics never change.

    As the issue asks, ``weight`` and ``bias`` are trainable parameters here (torchvision's
    ``FrozenBatchNorm2d`` holds them as buffers; torchvision's detection recipe freezes them too),
    so the method is "eval-mode BN, affine fine-tuned".
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batchnorms(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` by a :class:`FrozenBatchNorm2d` with its state."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            setattr(model, name, FrozenBatchNorm2d.from_batchnorm(child))
        else:
            freeze_batchnorms(child)
    return model


# ----------------------------------------------------------------------------- environment


def environment(model: nn.Module | None = None) -> dict:
    """What decides float results beyond the commit: CPU, vector ISA torch uses, torch build,
    threads, whether cbn's C++ kernels ran (None where the model has no CBN layer) and which copy of
    their fused loops (:func:`cbn.kernels.instruction_set`). No paths."""
    cpu, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split()
                               if f.startswith(("avx", "fma", "f16c", "amx", "sse4")))
                break
    except OSError:
        pass
    kernels = instruction_set = None
    if model is not None:
        from cbn import CrossIterationBatchNorm2d

        if any(isinstance(m, CrossIterationBatchNorm2d) for m in model.modules()):
            import cbn.kernels

            kernels = bool(cbn.kernels.active())
            instruction_set = cbn.kernels.instruction_set() if kernels else None
    return {
        "cpu": cpu, "cpu_flags": flags, "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "torch_git": torch.version.git_version,
        "torch_debug": bool(torch.version.debug), "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(), "python": platform.python_version(),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cbn_kernels_ran": kernels, "cbn_kernels_env": os.environ.get("CBN_KERNELS", "1"),
        "cbn_kernels_instruction_set": instruction_set,
    }


# ----------------------------------------------------------------------------- pretraining


class EncoderClassifier(nn.Module):
    """The FCN's encoder (same module names: ``down.<level>.<layer>``), global average pooling and
    a linear layer to the 10 Fashion-MNIST classes."""

    def __init__(self, norm, widths: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        from cbn.experiments.segmentation import FCN

        self.down = FCN(norm, widths).down
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
        return self.fc(x.mean(dim=(2, 3)))


@dataclass
class PretrainConfig:
    widths: tuple = (8, 16, 32, 64, 128)
    batch_size: int = 128
    epochs: int = 2
    base_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bn_momentum: float = 0.1
    pad: int = 2  # 28x28 -> 32x32 (so the 5 levels see 32, 16, 8, 4, 2)
    crop_padding: int = 2  # random-crop augmentation, plus horizontal flips
    seed: int = 0
    train_images: int = 60000
    data_dir: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, pad: int) -> float:
    from cbn.experiments.data import normalize

    model.eval()
    correct = 0
    for start in range(0, len(labels), 1000):
        x = F.pad(images[start : start + 1000], (pad,) * 4)
        correct += int((model(normalize(x)).argmax(1) == labels[start : start + 1000]).sum())
    model.train()
    return 100.0 * correct / len(labels)


class PretrainRun(NamedTuple):
    """What :func:`train_classifier` leaves: the trained model, its per-epoch curve, the steps it
    took, the data it used and when it started."""

    model: nn.Module
    curve: list
    steps: int
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    wall0: float


def train_classifier(cfg, make_model, accuracy, progress: bool = True, log_every: int = 100) -> PretrainRun:
    """The pretraining both studies share: ``make_model()`` trained with BatchNorm on Fashion-MNIST
    classification (the first ``cfg.train_images`` training images padded by ``cfg.pad``, random
    crops, SGD with momentum and a cosine schedule), tested after every epoch with
    ``accuracy(model, images, labels, pad)``."""
    from cbn.experiments.data import load_split, train_batches

    torch.set_num_threads(cfg.threads)
    wall0 = time.perf_counter()
    train_images, train_labels = load_split("train", cfg.data_dir)
    test_images, test_labels = load_split("test", cfg.data_dir)
    train_images, train_labels = train_images[: cfg.train_images], train_labels[: cfg.train_images]
    padded = F.pad(train_images, (cfg.pad,) * 4)
    torch.manual_seed(cfg.seed)
    model = make_model()
    total = max(1, len(train_labels) // cfg.batch_size * cfg.epochs)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    curve, step = [], 0
    model.train()
    for epoch in range(cfg.epochs):
        loss_sum, seen = 0.0, 0
        for x, y in train_batches(padded, train_labels, cfg.batch_size, cfg.seed, epoch, padding=cfg.crop_padding):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item()
            seen += 1
            if progress and step % log_every == 0:
                print(f"[pretrain] step {step}/{total} loss {loss.item():.3f} "
                      f"{time.perf_counter() - wall0:.0f}s", flush=True)
        test_acc = accuracy(model, test_images, test_labels, cfg.pad)
        curve.append({"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, seen), "test_accuracy": test_acc})
        if progress:
            print(f"[pretrain] epoch {epoch + 1}: train loss {loss_sum / max(1, seen):.4f}  test acc {test_acc:.2f}", flush=True)
    return PretrainRun(model, curve, total, train_images, train_labels, test_images, test_labels, wall0)


def pretrain(cfg: PretrainConfig, weights_path: str = PRETRAINED, progress: bool = True) -> dict:
    """Train the encoder with BatchNorm on Fashion-MNIST classification; save its weights to
    ``weights_path`` and its record beside it (``.json``). Returns the record."""
    from cbn.experiments.train import source_commit

    run = train_classifier(cfg, lambda: EncoderClassifier(lambda c: nn.BatchNorm2d(c, momentum=cfg.bn_momentum),
                                                          cfg.widths), _accuracy, progress)
    model, curve, total, train_images, train_labels, wall0 = (run.model, run.curve, run.steps, run.train_images,
                                                              run.train_labels, run.wall0)
    path = Path(weights_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("down.")}
    torch.save(state, path)
    record = {
        "name": path.stem, "what": "FCN encoder (widths 8-128) + global pool + linear, BatchNorm, "
                                   "Fashion-MNIST classification, all training images padded to 32x32",
        "config": asdict(cfg), "steps": total, "commit": source_commit(), "curve": curve,
        "test_accuracy": curve[-1]["test_accuracy"],
        "train_accuracy_eval_mode": _accuracy(model, train_images[:10000], train_labels[:10000], cfg.pad),
        "weights": path.name, "weights_sha256": _sha256(path), "saved_keys": len(state),
        "environment": environment(model), "wall_seconds": time.perf_counter() - wall0,
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    return record


# ----------------------------------------------------------------------------- fine-tuning models


def _load_matching(model: nn.Module, state: dict, conv_only: bool) -> int:
    """Copy every entry of ``state`` whose key and shape ``model`` has (conv weights only with
    ``conv_only``); returns how many were copied."""
    own = model.state_dict()
    modules = dict(model.named_modules())
    loaded = {}
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            continue
        if conv_only and not isinstance(modules.get(key.rpartition(".")[0]), nn.Conv2d):
            continue
        loaded[key] = value
    model.load_state_dict(loaded, strict=False)
    return len(loaded)


def build_finetune_model(cfg, proto: dict, process_group=None) -> nn.Module:
    """The FCN of a fine-tuning run (``cfg.pretrained`` set; ``cfg.init``: None loads every
    pretrained entry the model has, ``"conv"`` only the convolution weights, ``"scratch"`` none).
    Sets ``model.pretrained_info`` (weights' sha256, entries loaded) for the record."""
    import cbn
    from cbn.experiments.mabn import MABN2d, centralize_convolutions
    from cbn.experiments.segmentation import FCN, build_segmentation_model

    use = bool(cfg.pretrained) and cfg.init != "scratch"
    state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True) if use else {}
    torch.manual_seed(cfg.seed)
    bn = lambda c: nn.BatchNorm2d(c, momentum=cfg.bn_momentum)  # noqa: E731
    if cfg.kind in ("cbn", "frozen-bn"):
        net = FCN(bn, cfg.widths)
        loaded = _load_matching(net, state, cfg.init == "conv")
        if cfg.kind == "cbn":
            net = cbn.convert_model(net, window=proto["window"], burnin=proto["burnin"], **cfg.convert)
        else:
            net = freeze_batchnorms(net)
    elif cfg.kind == "mabn":
        net = FCN(lambda c: MABN2d(c, window=proto["window"], warmup=proto["burnin"], momentum=cfg.bn_momentum),
                  cfg.widths)
        centralize_convolutions(net)
        loaded = _load_matching(net, state, cfg.init == "conv")
    else:
        net = build_segmentation_model(replace(cfg, pretrained=None), proto, process_group)
        loaded = _load_matching(net, state, cfg.init == "conv")
    net.pretrained_info = ({"weights": Path(cfg.pretrained).name, "sha256": _sha256(Path(cfg.pretrained)),
                            "entries_loaded": loaded, "init": cfg.init or "all"} if use
                           else {"weights": None, "init": "scratch"})
    return net


# ----------------------------------------------------------------------------- the study


METHOD_DEFS = {
    "frozen-bn": {"kind": "frozen-bn", "label": "frozen BN (affine trained)"},
    "gn": {"kind": "gn", "init": "scratch", "label": "GN from scratch"},
    "gn-pretrained": {"kind": "gn", "init": "conv", "label": "GN, pretrained convs"},
    "mabn": {"kind": "mabn", "label": "MABN"},
}
CORE_METHODS = ("frozen-bn", "bn", "gn", "gn-pretrained", "mabn", "cbn", "cbn-diff")
ALL_METHODS = CORE_METHODS + ("brn", "naive", "syncbn")
# The dense study's regime (docs/data/dense/PILOT.md, preset DENSE) from the pretrained encoder.
BASE = {"arch": "fcn", "widths": (8, 16, 32, 64, 128), "base_lr": 0.2, "photometric": 0.8, "images": 4000,
        "pretrained": PRETRAINED}


def _spec(methods, batch_sizes, seeds, small_batch_seeds, base_overrides: dict):
    from cbn.experiments.dense_sweep import StudySpec

    @dataclass(frozen=True)
    class FinetuneSpec(StudySpec):
        def configs(self, out: str) -> list:
            return _study_order(super().configs(out), self.methods)

    # the large batch is the reference: BN only (cross-iteration methods would have a window of 1)
    skip = tuple((m, b) for m in methods for b in batch_sizes if b >= 16 and m != "bn")
    return FinetuneSpec(methods=tuple(methods), batch_sizes=tuple(batch_sizes), seeds=tuple(seeds),
                     small_batch_seeds=tuple(small_batch_seeds), small_batch=2,
                     base={**BASE, **base_overrides}, extra_methods=dict(METHOD_DEFS), skip=skip)


def _study_order(configs: list, methods: tuple) -> list:
    """The study's runs in the order they run: seeds 0-2 at batch 2, the batch-16 reference, seeds
    0-2 at batch 1, then the further seeds (batch 2 first). A cut study keeps paired cells."""
    order = {m: i for i, m in enumerate(methods)}

    def key(c):
        if c.seed < 3:
            phase = 0 if c.batch_size == 2 else 1 if c.batch_size >= 16 else 2
        else:
            phase = 3 if c.batch_size == 2 else 4
        return (phase, c.seed, order.get(c.method, 99), c.batch_size)

    return sorted(configs, key=key)


def run(args) -> int:
    from cbn.experiments import dense_sweep

    spec = _spec(args.methods, args.batch_sizes, args.seeds, args.small_batch_seeds,
                 {k: dense_sweep._parse_value(v) for k, _, v in (s.partition("=") for s in args.set)})
    if not Path(spec.base["pretrained"]).exists():
        raise SystemExit(f"no pretrained weights at {spec.base['pretrained']}: run `python -m "
                         f"cbn.experiments.finetune pretrain` first")
    dense_sweep.run_study(spec, args.out, args.commit_every, args.dry_run)
    if not args.dry_run:
        print(summary(args.out)["table"])
    return 0


def summary(out: str = OUT, reference: str = "bn@16", default: str = "cbn-diff") -> dict:
    """The dense study's summary of the records (``results.md``, ``summary.json``,
    ``miou_vs_batch.png``) plus this study's own: every method against the default CBN at the same
    batch (paired by seed), the convergence check of the large-batch reference (test mIoU gained
    over the last quarter of its run) and the curves (``curves.png``), in ``finetune.md`` /
    ``finetune.json``."""
    from cbn.experiments import dense_sweep
    from cbn.experiments.significance import compare

    result = dense_sweep.summary(out, reference)
    out_dir = Path(out)
    records = [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*.json"))]
    cells = {(c["method"], c["batch_size"]): c for c in result["cells"]}
    labels, _ = dense_sweep._labels(out_dir)
    lines = ["| batch | default CBN | against | default minus other (mIoU points) | default higher in | paired p (n) | Welch p |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for batch in sorted({b for _, b in cells}, reverse=True):
        mine = cells.get((default, batch))
        if mine is None:
            continue
        for (method, b), other in sorted(cells.items()):
            if b != batch or method == default:
                continue
            c = compare(mine["test_miou"], other["test_miou"])
            pairs = [s for s in mine["test_miou"] if s in other["test_miou"]]
            wins = sum(mine["test_miou"][s] > other["test_miou"][s] for s in pairs)
            rows.append({"batch": batch, "against": method, "wins": wins, **c})
            lines.append(f"| {batch} | {mine['mean']:.2f} | {labels.get(method, method)} ({other['mean']:.2f}) | "
                         f"{c['diff']:+.2f} | {wins} of {len(pairs)} | {dense_sweep._p(c['paired_p'])} ({c['n_pairs']}) | "
                         f"{dense_sweep._p(c['welch_p'])} |")
        ref_method, _, ref_batch = reference.partition("@")
        ref = cells.get((ref_method, int(ref_batch)))
        if ref is not None and int(ref_batch) != batch:
            c = compare(mine["test_miou"], ref["test_miou"])
            rows.append({"batch": batch, "against": reference, **c})
            lines.append(f"| {batch} | {mine['mean']:.2f} | {labels.get(ref_method, ref_method)} at batch {ref_batch} "
                         f"({ref['mean']:.2f}) | {c['diff']:+.2f} | | {dense_sweep._p(c['paired_p'])} ({c['n_pairs']}) | "
                         f"{dense_sweep._p(c['welch_p'])} |")
    convergence = []
    for r in records:
        curve = r.get("curve") or []
        if r["config"]["batch_size"] >= 16 and len(curve) >= 2 and not r["diverged"]:
            total = r["protocol"]["total_steps"]
            start = min(curve, key=lambda p: abs(p["step"] - 0.75 * total))
            convergence.append({"run": r["name"], "from_step": start["step"], "to_step": curve[-1]["step"],
                                "gain": curve[-1]["test_miou"] - start["test_miou"]})
    conv_lines = [f"- {c['run']}: {c['gain']:+.2f} mIoU points from step {c['from_step']} to {c['to_step']}"
                  f" ({'converged by the issue rule (< 0.5)' if c['gain'] < 0.5 else 'NOT converged by the issue rule (>= 0.5)'})"
                  for c in convergence]
    text = ("Every method against the default CBN (differentiable compensation) at the same batch, paired by seed:\n\n"
            + "\n".join(lines) + "\n\nConvergence of the large-batch runs (test mIoU over the last quarter):\n\n"
            + ("\n".join(conv_lines) or "- none recorded") + "\n")
    (out_dir / "finetune.md").write_text(text)
    (out_dir / "finetune.json").write_text(json.dumps({"against_default": rows, "convergence": convergence},
                                                      indent=2, default=float) + "\n")
    if records:
        plot_curves(records, labels, out_dir / "curves.png")
    result["against_default"] = text
    return result


def plot_curves(records: list, labels: dict, path: Path) -> None:
    """Test mIoU against scenes seen, mean over seeds, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in records:
        if r["diverged"] or not r.get("curve"):
            continue
        groups.setdefault((r["config"]["batch_size"], r["config"]["method"]), []).append(r["curve"])
    batches = sorted({b for b, _ in groups}, reverse=True)
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches), 4.2), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for (b, method), curves in sorted(groups.items()):
            if b != batch:
                continue
            n = min(len(c) for c in curves)
            xs = [curves[0][i]["images"] for i in range(n)]
            ys = [sum(c[i]["test_miou"] for c in curves) / len(curves) for i in range(n)]
            ax.plot(xs, ys, marker="o", label=f"{labels.get(method, method)} (n={len(curves)})")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("training scenes seen")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test mIoU (%), mean over seeds")
    fig.suptitle("Fine-tuning the BN-pretrained FCN encoder on composed scenes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbn.experiments.finetune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train and save the BN-pretrained encoder (once)")
    p.add_argument("--weights", default=PRETRAINED)
    p.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--train-images", type=int, default=PretrainConfig.train_images)
    r = sub.add_parser("run", help="run the missing fine-tuning runs (resumable), then the summary")
    r.add_argument("--out", default=OUT)
    r.add_argument("--methods", nargs="+", default=list(CORE_METHODS), help=f"of {list(ALL_METHODS)}")
    r.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 1, 16])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds at the large batch")
    r.add_argument("--small-batch-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a SegConfig value for every run")
    r.add_argument("--commit-every", type=float, default=None, metavar="SECONDS")
    r.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("summary", help="table, comparisons, plot from the records")
    s.add_argument("--out", default=OUT)
    s.add_argument("--reference", default="bn@16")
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, train_images=args.train_images)
        record = pretrain(cfg, args.weights)
        print(json.dumps({k: record[k] for k in ("test_accuracy", "train_accuracy_eval_mode", "commit", "wall_seconds")}))
        return 0
    if args.command == "run":
        return run(args)
    result = summary(args.out, args.reference)
    print(result["table"] + "\n\n" + result["comparisons"] + "\n\n" + result["against_default"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
