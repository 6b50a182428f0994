"""The paper's detector at 2 images per step: Faster R-CNN + FPN with BatchNorm, GroupNorm or CBN.

THE SCENES ARE COMPOSED: 128x128 black canvases with 2-4 real Fashion-MNIST items pasted on each
at random places and scales (``cbn.experiments.scenes.compose_scenes``), so every box is exact.
They are not photographs; the example shows the library on a real torchvision detector, it is not
evidence about COCO.

The model is torchvision's ``FasterRCNN`` assembled from torchvision parts, smaller than the
paper's ResNet-50 so that it trains on a CPU in minutes, with a norm layer where the authors put
CBN (the FPN and the box head, as torchvision's ``fasterrcnn_resnet50_fpn_v2`` builder does) and
in the backbone too, which is trained from scratch here (no downloads, so no frozen ImageNet
statistics to keep):

- backbone: ``torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])`` (a ResNet-10: the
  ResNet-18 layout with one block per stage) taking 1-channel input, ``norm_layer`` = the variant;
- ``BackboneWithFPN`` on stages 2-4 (strides 8, 16, 32) plus a max-pooled level (stride 64),
  64 channels, ``norm_layer`` = the variant in every FPN convolution;
- ``RPNHead`` (no norm), anchors 16, 32, 64, 128 pixels, aspect ratios 0.5, 1, 2;
- ``MultiScaleRoIAlign`` 7x7, ``FastRCNNConvFCHead`` with two 64-channel 3x3 convolutions, each
  followed by the variant's norm, and one 256-unit fully connected layer; 11 classes (10 + background).

Variants, same seed, same initial weights, same scenes in the same order, same optimizer:

- ``bn``: ``nn.BatchNorm2d`` everywhere above;
- ``gn``: ``nn.GroupNorm`` (32 groups, or fewer where a layer has fewer channels) in their place;
- ``cbn``: the ``bn`` model after ``cbn.convert_model(model, window=..., burnin=...)``.

Evaluation: COCO-style box mAP (IoU 0.50:0.95) and mAP@0.5 from ``pycocotools.cocoeval.COCOeval``
on composed scenes made from the Fashion-MNIST *test* images, eval mode (running statistics).

    python examples/detector.py                              # BN, GN, CBN: a few minutes on one core
    python examples/detector.py --steps 2000 --seeds 3       # longer, several seeds

Prints progress and a table; writes ``results.json`` and ``detector.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import cbn
from cbn.experiments.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_split
from cbn.experiments.norms import make_norm
from cbn.experiments.scenes import Scenes, compose_scenes, coco_ground_truth

VARIANTS = ("bn", "gn", "cbn")
LABELS = {"bn": "BatchNorm", "gn": "GroupNorm", "cbn": "CBN"}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
DATA = ("composed scenes: Fashion-MNIST items pasted on black 128x128 canvases "
        "(cbn.experiments.scenes.compose_scenes), exact boxes; not photographs")
TEST_SEED = 10_007  # the test scenes are the same for every run seed


def build_detector(variant: str, canvas: int = 128, channels: int = 64, window: int = 4,
                   burnin: int = 0) -> nn.Module:
    """The Faster R-CNN + FPN of the module docstring with ``variant``'s norm layers.

    ``cbn`` is the ``bn`` model converted with ``cbn.convert_model(model, window, burnin)``.
    Call ``torch.manual_seed`` first: the variants then start from the same convolution weights
    (neither BatchNorm nor GroupNorm draws random numbers at construction).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    norm = make_norm("gn", gn_groups=32) if variant == "gn" else nn.BatchNorm2d
    model = assemble_detector(resnet10_body(norm), norm, canvas, channels)
    if variant == "cbn":
        model = cbn.convert_model(model, window=window, burnin=burnin)
    return model


def resnet10_body(norm=nn.BatchNorm2d) -> ResNet:
    """The backbone's body: ``ResNet(BasicBlock, [1, 1, 1, 1])`` with a 1-channel stem."""
    body = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm)
    body.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # grey-level input
    return body


def assemble_detector(body: ResNet, norm, canvas: int = 128, channels: int = 64) -> nn.Module:
    """Faster R-CNN + FPN around ``body`` with ``norm`` (a constructor of one argument, the
    channels) in every FPN convolution and in the box head."""
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], channels,
                               extra_blocks=LastLevelMaxPool(), norm_layer=norm)
    levels = ["0", "1", "2", "pool"]
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * len(levels))
    representation = 256
    model = FasterRCNN(
        backbone, min_size=canvas, max_size=canvas,  # keep the canvas size: no resize to 800 pixels
        image_mean=[FASHION_MNIST_MEAN], image_std=[FASHION_MNIST_STD],
        rpn_anchor_generator=anchors, rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels, channels], [representation], norm_layer=norm),
        box_predictor=FastRCNNPredictor(representation, len(CLASSES) + 1),
        box_batch_size_per_image=64, box_detections_per_img=20,
    )
    return model


def images_and_targets(scenes: Scenes, idx: list[int]) -> tuple[list[torch.Tensor], list[dict]]:
    """torchvision's detection input: [0, 1] float images and targets (labels 1-10, 0 is background)."""
    images = [scenes.canvases[i].float() / 255 for i in idx]
    targets = [{"boxes": scenes.boxes[i], "labels": scenes.labels[i] + 1} for i in idx]
    return images, targets


@torch.no_grad()
def coco_map(model: nn.Module, scenes: Scenes, batch: int = 8) -> dict:
    """COCO box mAP (IoU 0.50:0.95), mAP@0.5 and mAP@0.75 of ``model`` in eval mode on ``scenes``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    was_training = model.training
    model.eval()
    detections = []
    for start in range(0, len(scenes.boxes), batch):
        idx = list(range(start, min(start + batch, len(scenes.boxes))))
        images, _ = images_and_targets(scenes, idx)
        for image_id, out in zip(idx, model(images)):
            for (x1, y1, x2, y2), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                      out["labels"].tolist()):
                detections.append({"image_id": image_id, "category_id": int(label),
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    model.train(was_training)
    if not detections:  # pycocotools cannot load an empty result list; nothing found scores 0
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = coco_ground_truth(scenes, CLASSES)
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # stats are -1 where no ground truth exists in an area range; the overall figures always have some.
    return {"map": float(evaluation.stats[0]), "map50": float(evaluation.stats[1]),
            "map75": float(evaluation.stats[2]), "detections": len(detections)}


def train_one(variant: str, seed: int, args, train: Scenes, test: Scenes, log) -> dict:
    """Train ``variant`` from scratch for ``args.steps`` steps of ``args.batch`` scenes; evaluate."""
    torch.manual_seed(seed)
    model = build_detector(variant, window=args.window, burnin=int(args.burnin_fraction * args.steps)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then a step down at 80 %
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 if s >= 0.8 * args.steps else 1.0))
    order = torch.randperm(len(train.boxes), generator=torch.Generator().manual_seed(seed))
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        idx = [int(order[(step * args.batch + j) % len(order)]) for j in range(args.batch)]
        images, targets = images_and_targets(train, idx)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # from-scratch detectors spike early
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            recent = statistics.fmean(losses[-args.log_every:])
            log(f"  [{variant} seed {seed}] step {step + 1}/{args.steps}  loss {recent:.3f}  "
                f"{elapsed:.0f}s, ETA {elapsed / (step + 1) * (args.steps - step - 1):.0f}s")
    seconds = time.perf_counter() - start
    record = {"variant": variant, "seed": seed, "step_ms": 1000 * seconds / args.steps,
              "train_loss_final": statistics.fmean(losses[-max(1, args.steps // 10):]), "losses": losses}
    if variant == "cbn":
        rows = cbn.pairing_report(model)
        record["pairing"] = cbn.pairing_summary(rows)
        record["compensated"] = sum(r.compensated for r in rows)
        record["cbn_layers"] = len(rows)
        log(f"  [cbn seed {seed}] {record['pairing']}")
    log(f"  [{variant} seed {seed}] evaluating on {len(test.boxes)} test scenes")
    start = time.perf_counter()
    record.update(coco_map(model, test))
    log(f"  [{variant} seed {seed}] mAP {record['map']:.3f}, mAP50 {record['map50']:.3f} "
        f"({time.perf_counter() - start:.0f}s)")
    return record


def summarize(records: list[dict]) -> list[dict]:
    """Per variant: mean (and per-seed list) of mAP, mAP50, final train loss, step time."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == variant]
        row = {"variant": variant, "seeds": len(runs)}
        for key in ("map", "map50", "train_loss_final", "step_ms"):
            row[key] = statistics.fmean(r[key] for r in runs)
            row[key + "_per_seed"] = [r[key] for r in runs]
        if "pairing" in runs[0]:
            row["pairing"] = runs[0]["pairing"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'norm':<10} {'mAP':>6} {'mAP50':>6} {'train loss':>10} {'step ms':>8}  seeds",
             "-" * 52]
    for r in rows:
        lines.append(f"{LABELS[r['variant']]:<10} {r['map']:>6.3f} {r['map50']:>6.3f} "
                     f"{r['train_loss_final']:>10.3f} {r['step_ms']:>8.0f}  {r['seeds']}")
    return "\n".join(lines)


def plot(records: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"bn": "tab:blue", "gn": "tab:green", "cbn": "tab:red"}
    for r in records:
        losses = torch.tensor(r["losses"])
        width = max(1, len(losses) // 20)
        smooth = losses.unfold(0, width, 1).mean(1) if len(losses) >= width else losses
        left.plot(range(width, width + len(smooth)), smooth, color=colors[r["variant"]], alpha=0.8,
                  label=f"{LABELS[r['variant']]} (seed {r['seed']})")
    left.set(xlabel="step", ylabel="training loss (running mean)", title="training loss")
    left.legend(fontsize=7)
    x = torch.arange(len(rows)).float()
    right.bar(x - 0.2, [r["map"] for r in rows], 0.4, label="mAP@[.5:.95]")
    right.bar(x + 0.2, [r["map50"] for r in rows], 0.4, label="mAP@.5")
    right.set_xticks(x.tolist(), [LABELS[r["variant"]] for r in rows])
    right.set(ylabel="COCO box mAP (pycocotools)", title="test mAP, composed scenes")
    right.legend(fontsize=7)
    fig.suptitle("Faster R-CNN + FPN, composed Fashion-MNIST scenes (not photographs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--batch", type=int, default=2, help="scenes per step")
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds 0 .. N-1")
    p.add_argument("--train-scenes", type=int, default=None,
                   help="distinct training scenes (default: steps x batch, every scene seen once)")
    p.add_argument("--test-scenes", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--window", type=int, default=4, help="CBN window (iterations pooled)")
    p.add_argument("--burnin-fraction", type=float, default=0.25, help="CBN burn-in, fraction of the steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("runs/detector"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"Faster R-CNN + FPN on COMPOSED scenes ({DATA}); batch {args.batch}, {args.steps} steps, "
        f"variants {', '.join(args.variants)}, {args.seeds} seed(s)")
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    test = compose_scenes(test_images, test_labels, args.test_scenes, seed=TEST_SEED)
    records, runs, start = [], args.seeds * len(args.variants), time.perf_counter()
    for seed in range(args.seeds):
        train = compose_scenes(train_images, train_labels, args.train_scenes or args.steps * args.batch, seed=seed)
        for variant in args.variants:
            done = len(records)
            eta = f", about {(time.perf_counter() - start) / done * (runs - done):.0f}s left" if done else ""
            log(f"run {done + 1}/{runs}: {LABELS[variant]}, seed {seed}{eta}")
            records.append(train_one(variant, seed, args, train, test, log))
    rows = summarize(records)
    text = table(rows)
    log("\nCOCO box mAP on composed test scenes (eval mode); train loss: mean of the last 10 % of steps\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"data": DATA, "config": config, "commit": _commit(), "torch": torch.__version__,
              "test_scenes": args.test_scenes, "summary": rows, "runs": records}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(records, rows, args.out / "detector.png")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'detector.png'}")
    return result


if __name__ == "__main__":
    main()
