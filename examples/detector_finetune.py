"""Fine-tuning the detector from a BatchNorm-pretrained backbone at 2 images per step (issue 28, item 3).

The question of issue 28 on the detector of ``examples/detector.py`` (torchvision's Faster R-CNN +
FPN, ResNet-10 backbone, COMPOSED scenes: Fashion-MNIST items pasted on black 128x128 canvases,
not photographs): the backbone was pretrained with BatchNorm (here on Fashion-MNIST
classification, the stand-in for ImageNet) and only 2 images fit per step. Which norms?

1. **Pretraining** (once): the detector's backbone body (``resnet10_body``: ``ResNet(BasicBlock,
   [1, 1, 1, 1])``, 1-channel stem, BatchNorm) + global pool + a 10-way linear layer, trained on
   all 60,000 Fashion-MNIST training images (padded to 32x32, crop + flip) at batch 256. The body's
   weights are saved without the classifier, convolution weights in float16 (the .pt stays
   small; the test accuracy in the record is measured with the saved, rounded weights), with a
   JSON record beside them (config, commit, accuracy, sha256).
2. **Fine-tuning** at 2 images per step from those weights, the example's protocol unchanged
   (SGD 0.02, momentum 0.9, wd 1e-4, linear warm-up over 10 %, x0.1 at 80 %, gradient clipping
   at 10, every training scene seen once), same seeds, same scenes, same head init for every
   variant; nothing tuned per variant:

   =============  ======================================  ====================================
   variant        backbone norms (pretrained state)        FPN and box-head norms (new)
   =============  ======================================  ====================================
   ``frozen-bn``  frozen BN: running statistics fixed,     BatchNorm
                  affine trained (torchvision's recipe
                  freezes the statistics)
   ``bn``         BatchNorm                                BatchNorm
   ``gn``         BatchNorm                                GroupNorm (32 groups)
   ``cbn``        CBN (``cbn.convert_model``, default)     CBN (default)
   ``cbn-heads``  frozen BN                                CBN (default)
   =============  ======================================  ====================================

Commands (from the repository root, ``PYTHONPATH=src:.``)::

    OMP_NUM_THREADS=1 python -m examples.detector_finetune pretrain     # once
    OMP_NUM_THREADS=1 python -m examples.detector_finetune run --steps 600 --seeds 0 1 2
    python -m examples.detector_finetune summary
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cbn
from cbn.experiments.finetune import FrozenBatchNorm2d, environment, freeze_batchnorms
from examples.detector import (assemble_detector, coco_map, images_and_targets, resnet10_body,
                               TEST_SEED, DATA)

OUT = "docs/data/detector-finetune"
PRETRAINED = "docs/data/finetune/pretrained/detector-resnet10.pt"
VARIANTS = {
    "frozen-bn": {"backbone": "frozen-bn", "heads": "bn", "label": "frozen BN backbone + BN heads"},
    "bn": {"backbone": "bn", "heads": "bn", "label": "BN everywhere"},
    "gn": {"backbone": "bn", "heads": "gn", "label": "BN backbone + GN heads"},
    "cbn": {"backbone": "cbn", "heads": "cbn", "label": "CBN everywhere (default)"},
    "cbn-heads": {"backbone": "frozen-bn", "heads": "cbn", "label": "frozen BN backbone + CBN heads"},
}


# ----------------------------------------------------------------------------- pretraining


@dataclass
class PretrainConfig:
    batch_size: int = 256
    epochs: int = 2
    base_lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    pad: int = 2  # 28x28 -> 32x32
    crop_padding: int = 2
    seed: int = 0
    train_images: int = 60000
    data_dir: str | None = None
    threads: int = 1


def classifier(body: nn.Module | None = None) -> nn.Module:
    """The backbone body with a 10-way linear classifier (torchvision's ResNet forward: stem, 4
    stages, global average pool, ``fc``)."""
    body = body if body is not None else resnet10_body(nn.BatchNorm2d)
    body.fc = nn.Linear(512, 10)
    return body


def body_state(model: nn.Module) -> dict:
    """The body's state without the classifier, floating-point convolution weights in float16."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            continue
        state[key] = value.half() if value.is_floating_point() and value.dim() == 4 else value.clone()
    return state


def load_body(body: nn.Module, state: dict) -> int:
    """Load a saved body state (float16 entries back to float32); every key must match."""
    result = body.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                  strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"body state mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    return len(state)


@torch.no_grad()
def accuracy(model: nn.Module, images, labels, pad: int) -> float:
    from cbn.experiments.data import normalize

    model.eval()
    correct = 0
    for start in range(0, len(labels), 1000):
        x = F.pad(images[start : start + 1000], (pad,) * 4)
        correct += int((model(normalize(x)).argmax(1) == labels[start : start + 1000]).sum())
    model.train()
    return 100.0 * correct / max(1, len(labels))


def pretrain(cfg: PretrainConfig, weights_path: str = PRETRAINED, progress: bool = True) -> dict:
    """The body's BatchNorm pretraining (the loop of :func:`cbn.experiments.finetune.train_classifier`);
    saves the body's weights (float16 convolutions) and its record beside them."""
    from cbn.experiments.finetune import train_classifier
    from cbn.experiments.train import source_commit

    run = train_classifier(cfg, classifier, accuracy, progress, log_every=25)
    model, curve, total, wall0 = run.model, run.curve, run.steps, run.wall0
    train_images, train_labels, test_images, test_labels = (run.train_images, run.train_labels, run.test_images,
                                                            run.test_labels)
    state = body_state(model)
    path = Path(weights_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    # the accuracy of what was saved (float16 convolution weights), not of the float32 model
    saved = classifier()
    load_body(saved, torch.load(path, map_location="cpu", weights_only=True))
    saved.fc.load_state_dict(model.fc.state_dict())
    record = {
        "name": path.stem,
        "what": "the detector's backbone body (examples/detector.py resnet10_body: ResNet(BasicBlock, [1,1,1,1]), "
                "1-channel stem, BatchNorm) + global pool + linear, Fashion-MNIST classification, all "
                "training images padded to 32x32; saved without the classifier, conv weights float16",
        "config": asdict(cfg), "steps": total, "commit": source_commit(), "curve": curve,
        "test_accuracy_float32": curve[-1]["test_accuracy"] if curve else None,
        "test_accuracy": accuracy(saved, test_images, test_labels, cfg.pad),
        "train_accuracy_eval_mode": accuracy(saved, train_images[:10000], train_labels[:10000], cfg.pad),
        "weights": path.name, "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "weights_bytes": path.stat().st_size, "saved_keys": len(state),
        "environment": environment(model), "wall_seconds": time.perf_counter() - wall0,
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    return record


# ----------------------------------------------------------------------------- fine-tuning


def build(variant: str, seed: int, pretrained: str | None = PRETRAINED, window: int = 4, burnin: int = 0,
          state: dict | None = None) -> nn.Module:
    """The detector of ``variant`` (see the module docstring) with the pretrained backbone body.

    The heads' initial weights depend only on ``seed`` (the body is built, then overwritten by the
    pretrained state; neither BN nor GN draws random numbers), so they are the same for every
    variant of a seed. ``state`` (a body state) replaces loading ``pretrained``.
    """
    from cbn.experiments.norms import make_norm

    spec = VARIANTS[variant]
    torch.manual_seed(seed)
    body = resnet10_body(nn.BatchNorm2d)
    if state is None and pretrained:
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
    loaded = load_body(body, state) if state is not None else 0
    head_norm = make_norm("gn", gn_groups=32) if spec["heads"] == "gn" else nn.BatchNorm2d
    model = assemble_detector(body, head_norm)
    if spec["backbone"] == "frozen-bn":
        freeze_batchnorms(model.backbone.body)
    if "cbn" in (spec["backbone"], spec["heads"]):  # converts every nn.BatchNorm2d left (frozen ones are not)
        model = cbn.convert_model(model, window=window, burnin=burnin)
    model.pretrained_entries = loaded
    return model


def norm_census(model: nn.Module) -> dict:
    """How many norm layers of each kind the backbone body and the heads (FPN + box head) hold."""
    def count(module):
        out: dict = {}
        for m in module.modules():
            kind = type(m).__name__
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)) or "BatchNorm" in kind:
                out[kind] = out.get(kind, 0) + 1
        return out

    return {"backbone": count(model.backbone.body),
            "heads": count(nn.ModuleList([model.backbone.fpn, model.roi_heads.box_head]))}


@dataclass
class RunConfig:
    variant: str
    seed: int
    steps: int = 600
    batch: int = 2
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    decay_at: float = 0.8
    clip: float = 10.0
    window: int = 4
    burnin_fraction: float = 0.25
    test_scenes: int = 200
    train_eval_scenes: int = 100
    curve_points: int = 4
    threads: int = 1
    pretrained: str | None = PRETRAINED


def run_one(cfg: RunConfig, train, test, log=print) -> dict:
    """Train one variant and seed; returns its record (metrics, curve, step times)."""
    from cbn.experiments.train import source_commit

    torch.set_num_threads(cfg.threads)
    wall0 = time.perf_counter()
    model = build(cfg.variant, cfg.seed, cfg.pretrained, cfg.window, int(cfg.burnin_fraction * cfg.steps)).train()
    census = norm_census(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 if s >= cfg.decay_at * cfg.steps else 1.0))
    order = torch.randperm(len(train.boxes), generator=torch.Generator().manual_seed(cfg.seed))
    checkpoints = {round(cfg.steps * (i + 1) / cfg.curve_points) for i in range(cfg.curve_points)}
    losses, step_s, curve, last_eval = [], [], [], None
    for step in range(cfg.steps):
        idx = [int(order[(step * cfg.batch + j) % len(order)]) for j in range(cfg.batch)]
        images, targets = images_and_targets(train, idx)
        t0 = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if step + 1 in checkpoints:
            m = last_eval = coco_map(model, test)
            curve.append({"step": step + 1, "images": (step + 1) * cfg.batch, "test_map": m["map"],
                          "test_map50": m["map50"],
                          "train_loss_recent": statistics.fmean(losses[-max(1, cfg.steps // 20):])})
            log(f"  [{cfg.variant} seed {cfg.seed}] step {step + 1}/{cfg.steps} loss "
                f"{curve[-1]['train_loss_recent']:.3f} test mAP {m['map']:.3f} mAP50 {m['map50']:.3f} "
                f"median step {1000 * statistics.median(step_s):.0f} ms, {time.perf_counter() - wall0:.0f}s")
    diverged = not all(math.isfinite(v) for v in losses)
    metrics = last_eval if curve and curve[-1]["step"] == cfg.steps else coco_map(model, test)
    # eval-mode mAP on the first training scenes (seen once each): under- or over-fitting beside test
    train_metrics = coco_map(model, type(train)(*(field[: cfg.train_eval_scenes] for field in train)))
    record = {
        "name": f"{cfg.variant}_seed{cfg.seed}", "variant": cfg.variant, "label": VARIANTS[cfg.variant]["label"],
        "backbone_norm": VARIANTS[cfg.variant]["backbone"], "head_norm": VARIANTS[cfg.variant]["heads"],
        "config": asdict(cfg), "data": DATA, "commit": source_commit(), "environment": environment(model),
        "pretrained": ({"weights": Path(cfg.pretrained).name,
                        "sha256": hashlib.sha256(Path(cfg.pretrained).read_bytes()).hexdigest(),
                        "entries_loaded": model.pretrained_entries} if cfg.pretrained else None),
        "norms": census, "diverged": diverged,
        "test_map": metrics["map"], "test_map50": metrics["map50"], "test_map75": metrics.get("map75"),
        "test_detections": metrics.get("detections"),
        "train_map": train_metrics["map"] if train_metrics else None,
        "train_map50": train_metrics["map50"] if train_metrics else None,
        "train_eval_scenes": cfg.train_eval_scenes,
        "train_loss_final": statistics.fmean(losses[-max(1, cfg.steps // 10):]),
        "step_ms_median": 1000 * statistics.median(step_s), "step_ms_mean": 1000 * statistics.fmean(step_s),
        "curve": curve, "losses": [round(v, 5) for v in losses], "wall_seconds": time.perf_counter() - wall0,
    }
    if "cbn" in (VARIANTS[cfg.variant]["backbone"], VARIANTS[cfg.variant]["heads"]):
        rows = cbn.pairing_report(model)
        record["pairing"] = cbn.pairing_summary(rows)
        record["cbn_layers"], record["compensated"] = len(rows), sum(r.compensated for r in rows)
    return record


def run(args) -> int:
    from cbn.experiments.data import load_split
    from cbn.experiments.scenes import compose_scenes

    out = Path(args.out) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.pretrained).exists():
        raise SystemExit(f"no pretrained weights at {args.pretrained}: run `python -m examples.detector_finetune pretrain`")
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    test = compose_scenes(test_images, test_labels, args.test_scenes, seed=TEST_SEED)
    for seed in args.seeds:
        train = None
        for variant in args.variants:
            path = out / f"{variant}_seed{seed}.json"
            if path.exists():
                print(f"done: {path.name}", flush=True)
                continue
            if train is None:
                train = compose_scenes(train_images, train_labels, args.steps * args.batch, seed=seed)
            cfg = RunConfig(variant=variant, seed=seed, steps=args.steps, batch=args.batch, lr=args.lr,
                            window=args.window, burnin_fraction=args.burnin_fraction,
                            test_scenes=args.test_scenes, threads=args.threads, pretrained=args.pretrained)
            print(f"run {variant} seed {seed}: {args.steps} steps", flush=True)
            record = run_one(cfg, train, test)
            path.write_text(json.dumps(record, indent=1, default=float) + "\n")
            print(f"wrote {path}: test mAP {record['test_map']:.4f} mAP50 {record['test_map50']:.4f} "
                  f"train mAP {record['train_map']:.4f} step {record['step_ms_median']:.0f} ms", flush=True)
    return 0


# ----------------------------------------------------------------------------- summary


def summary(out: str = OUT, default: str = "cbn") -> dict:
    """Table (mean +- std over seeds), paired t-tests of ``default`` against each variant, step
    times; ``summary.md``, ``summary.json`` and ``summary.png`` in ``out``."""
    from cbn.experiments.significance import compare, summarize

    out_dir = Path(out)
    records = [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*.json"))]
    by = {}
    for r in records:
        by.setdefault(r["variant"], {})[r["config"]["seed"]] = r
    order = [v for v in VARIANTS if v in by]
    rows, lines = [], ["| variant | backbone / heads | test mAP 0.50:0.95 | test mAP@0.5 | train mAP (eval mode) "
                       "| train loss (last 10 %) | step ms (median) | seeds |",
                       "|---|---|---|---|---|---|---|---|"]
    for v in order:
        runs = by[v]
        cell = {"variant": v, "label": VARIANTS[v]["label"], "seeds": sorted(runs)}
        for key in ("test_map", "test_map50", "train_map", "train_loss_final", "step_ms_median"):
            values = [runs[s][key] for s in sorted(runs) if runs[s].get(key) is not None]
            s = summarize([100 * x for x in values] if "map" in key else values)
            cell[key] = {"mean": s.mean, "std": s.std, "per_seed": {str(k): runs[k][key] for k in sorted(runs)}}
        rows.append(cell)
        lines.append(f"| `{v}` | {VARIANTS[v]['backbone']} / {VARIANTS[v]['heads']} | "
                     f"{cell['test_map']['mean']:.2f} ± {cell['test_map']['std']:.2f} | "
                     f"{cell['test_map50']['mean']:.2f} ± {cell['test_map50']['std']:.2f} | "
                     f"{cell['train_map']['mean']:.2f} ± {cell['train_map']['std']:.2f} | "
                     f"{cell['train_loss_final']['mean']:.3f} | {statistics.median(cell['step_ms_median']['per_seed'].values()):.0f} | "
                     f"{len(runs)} |")
    tests, tlines = [], ["| default CBN minus | mAP difference (points) | higher in | paired p | "
                         "mAP@0.5 difference | higher in | paired p |", "|---|---|---|---|---|---|---|"]
    if default in by:
        for v in order:
            if v == default:
                continue
            entry = {"against": v}
            cols = []
            for key in ("test_map", "test_map50"):
                a = {s: 100 * r[key] for s, r in by[default].items()}
                b = {s: 100 * r[key] for s, r in by[v].items()}
                c = compare(a, b)
                pairs = sorted(set(a) & set(b))
                wins = sum(a[s] > b[s] for s in pairs)
                entry[key] = {**c, "wins": wins}
                cols += [f"{c['diff']:+.2f}", f"{wins} of {len(pairs)}", _p(c["paired_p"])]
            tests.append(entry)
            tlines.append(f"| {VARIANTS[v]['label']} | " + " | ".join(cols) + " |")
    text = ("Test mAP (%, COCO box mAP from pycocotools on composed test scenes), mean ± std over seeds:\n\n"
            + "\n".join(lines) + "\n\nPaired by seed (same scenes, order and head init):\n\n" + "\n".join(tlines) + "\n")
    (out_dir / "summary.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps({"cells": rows, "against_default": tests}, indent=1,
                                                     default=float) + "\n")
    if records:
        plot(records, out_dir / "summary.png")
    return {"text": text, "cells": rows, "against_default": tests}


def _p(p: float) -> str:
    if p != p:
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def plot(records: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(VARIANTS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for v in VARIANTS:
        runs = [r for r in records if r["variant"] == v and r["curve"]]
        if not runs:
            continue
        n = min(len(r["curve"]) for r in runs)
        xs = [runs[0]["curve"][i]["step"] for i in range(n)]
        left.plot(xs, [100 * statistics.fmean(r["curve"][i]["test_map"] for r in runs) for i in range(n)],
                  marker="o", color=colors[v], label=f"{VARIANTS[v]['label']} (n={len(runs)})")
        losses = torch.tensor([r["losses"] for r in runs]).mean(0)
        width = max(1, len(losses) // 25)
        smooth = losses.unfold(0, width, 1).mean(1)
        mid.plot(range(width, width + len(smooth)), smooth, color=colors[v], label=VARIANTS[v]["label"])
    left.set(xlabel="step (2 scenes each)", ylabel="test mAP 0.50:0.95 (%), mean over seeds", title="test mAP")
    mid.set(xlabel="step", ylabel="training loss (running mean, mean over seeds)", title="training loss")
    cells = [(v, [r for r in records if r["variant"] == v]) for v in VARIANTS]
    cells = [(v, rs) for v, rs in cells if rs]
    for i, (v, rs) in enumerate(cells):
        right.scatter([i] * len(rs), [100 * r["test_map"] for r in rs], color=colors[v])
        right.scatter([i + 0.25] * len(rs), [100 * r["train_map"] for r in rs], color=colors[v], marker="x")
    right.set_xticks(range(len(cells)), [v for v, _ in cells])
    right.set(ylabel="mAP (%)", title="per seed: test (o) and train, eval mode (x)")
    for ax in (left, mid, right):
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle("Faster R-CNN + FPN from a BN-pretrained ResNet-10, 2 composed scenes per step (not photographs)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.detector_finetune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train and save the BN-pretrained backbone body (once)")
    p.add_argument("--weights", default=PRETRAINED)
    p.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--train-images", type=int, default=PretrainConfig.train_images)
    p.add_argument("--data-dir", default=None)
    r = sub.add_parser("run", help="the missing runs (resumable: a run is done when its record exists)")
    r.add_argument("--out", default=OUT)
    r.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--lr", type=float, default=0.02)
    r.add_argument("--window", type=int, default=4)
    r.add_argument("--burnin-fraction", type=float, default=0.25)
    r.add_argument("--test-scenes", type=int, default=200)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--pretrained", default=PRETRAINED)
    s = sub.add_parser("summary", help="table, paired tests and plot from the records")
    s.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, train_images=args.train_images,
                             data_dir=args.data_dir)
        record = pretrain(cfg, args.weights)
        print(json.dumps({k: record[k] for k in ("test_accuracy", "test_accuracy_float32", "commit",
                                                 "weights_bytes", "wall_seconds")}))
        return 0
    if args.command == "run":
        return run(args)
    print(summary(args.out)["text"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
