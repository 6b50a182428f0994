"""3-D segmentation at batch 1-2, the use case of Cross-Iteration BatchNorm, with MONAI's UNet.

THE DATA IS SYNTHETIC: volumes of random spheres in noise from MONAI's own generator
(``monai.data.synthetic.create_test_image_3d``), not medical images. The example shows how to
use the library on a real third-party 3-D model (its transposed-convolution decoder included)
and compares, under one protocol, BatchNorm, Cross-Iteration BatchNorm, GroupNorm and
InstanceNorm at the batch sizes 3-D training affords. It is a usage example, not evidence: the
evidence on real data is in docs/results.md.

    python examples/monai_unet3d.py                       # about a minute on one core
    python examples/monai_unet3d.py --size 16 --train-volumes 4 --test-volumes 2 --epochs 1   # smoke

Prints a table (test and train Dice in eval mode, step time), writes JSON and a PNG to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from monai.data.synthetic import create_test_image_3d
from monai.losses import DiceLoss
from monai.networks.nets import UNet

import cbn

NORMS = {
    "bn": "batch",
    "cbn": "batch",  # BatchNorm3d layers, converted
    "gn": ("group", {"num_groups": 2}),  # 2 divides every width, the 2-class output's included
    "in": "instance",
}


def make_volumes(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` synthetic (image, mask) pairs of ``size``^3 voxels, reproducible from ``seed``."""
    rng = np.random.RandomState(seed)
    pairs = [create_test_image_3d(size, size, size, num_objs=6, rad_max=max(3, size // 5), rad_min=2,
                                  noise_max=0.5, num_seg_classes=1, channel_dim=0, random_state=rng)
             for _ in range(count)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).float()
    masks = torch.from_numpy(np.stack([p[1] for p in pairs])).float()
    return images, masks


def build(norm: str, window: int, burnin: int) -> torch.nn.Module:
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
               num_res_units=1, norm=NORMS[norm])
    return cbn.convert_model(net, window=window, burnin=burnin) if norm == "cbn" else net


@torch.no_grad()
def dice(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean foreground Dice of the predicted classes, eval mode, one volume at a time."""
    model.eval()
    scores = []
    for image, mask in zip(images, masks):
        prediction = model(image[None]).argmax(1).float()
        overlap = (prediction * mask).sum()
        scores.append(float((2 * overlap + 1e-5) / (prediction.sum() + mask.sum() + 1e-5)))
    model.train()
    return statistics.fmean(scores)


def train_one(norm: str, args, train, test) -> dict:
    torch.manual_seed(args.seed)
    steps = args.epochs * (len(train[0]) // args.batch_size)
    model = build(norm, args.window, int(args.burnin_fraction * steps))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = DiceLoss(softmax=True, to_onehot_y=True)
    generator = torch.Generator().manual_seed(args.seed)
    t0, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train[0]), generator=generator)
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[start : start + args.batch_size]
            loss = loss_fn(model(train[0][idx]), train[1][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        print(f"  [{norm}] epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    record = {"norm": norm, "test_dice": dice(model, *test), "train_dice": dice(model, *train),
              "step_ms": 1000 * seconds / max(1, step), "steps": step}
    if norm == "cbn":
        record["pairing"] = cbn.pairing_summary(cbn.pairing_report(model))
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--norms", nargs="+", choices=sorted(NORMS), default=["bn", "cbn", "gn", "in"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--size", type=int, default=32, help="voxels per side")
    p.add_argument("--train-volumes", type=int, default=24)
    p.add_argument("--test-volumes", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--burnin-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/monai_unet3d")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("MONAI 3-D UNet on SYNTHETIC volumes (monai.data.synthetic.create_test_image_3d), "
          f"batch {args.batch_size}, {args.epochs} epochs, {args.size}^3 voxels")
    train = make_volumes(args.train_volumes, args.size, args.seed)
    test = make_volumes(args.test_volumes, args.size, args.seed + 1)
    records = [train_one(norm, args, train, test) for norm in args.norms]

    print(f"\n{'norm':<6} {'test Dice':>9} {'train Dice':>10} {'step ms':>8}   (eval mode, synthetic data)")
    for r in records:
        print(f"{r['norm']:<6} {r['test_dice']:9.3f} {r['train_dice']:10.3f} {r['step_ms']:8.1f}"
              + (f"   {r['pairing']}" if "pairing" in r else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"data": "synthetic (monai.data.synthetic.create_test_image_3d)", "config": vars(args), "runs": records}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _plot(records, out / "dice.png", args)
    print(f"results: {out / 'results.json'}  plot: {out / 'dice.png'}")
    return result


def _plot(records: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    xs = np.arange(len(records))
    ax.bar(xs - 0.2, [r["test_dice"] for r in records], 0.4, label="test")
    ax.bar(xs + 0.2, [r["train_dice"] for r in records], 0.4, label="train (eval mode)")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["norm"] for r in records])
    ax.set_ylabel("Dice")
    ax.set_title(f"MONAI 3-D UNet, batch {args.batch_size}, SYNTHETIC volumes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
