"""Semantic segmentation of composed Fashion-MNIST scenes: the dense task of the small-batch study.

**The scenes are composed, not photographed.** Each scene is a square canvas (black background)
on which a few 28x28 Fashion-MNIST images are pasted at random positions; the per-pixel label is
the class of the object whose pixel is visible there (1..10, the Fashion-MNIST class + 1) or 0 for
background. Training scenes are made from the training split, test scenes from the test split.
This is the dense-prediction analog of the paper's detection setting: large inputs, few images per
batch, and batch statistics that depend on each scene's content (how many objects, which ones).

Model: a small U-Net (Ronneberger et al., 2015) built from ``torch.nn`` with a norm factory, so
every normalization method gets the same network: each 3x3 convolution is followed by a norm and
a ReLU, two per level; 2x2 max pooling down, 2x2 stride-2 transposed convolutions up, skip
connections by concatenation, a 1x1 convolution to 11 class scores per pixel.

Protocol (recorded in every JSON record, the same for every method):
    * the same number of training images seen at every batch size (so batch 1 takes 16 times the
      steps of batch 16), over a fixed set of training scenes, reshuffled each pass by the seed,
      with random horizontal flips;
    * SGD with momentum, learning rate scaled linearly with the (global) batch,
      ``lr = base_lr * batch / ref_batch``, cosine decay to 0 over all steps, no warm-up;
    * per-pixel cross-entropy;
    * cross-iteration methods: window ``min(window_cap, max(1, ref_batch // batch))``, burn-in a
      fixed fraction of the steps; Batch Renorm: the ramps of :mod:`cbn.experiments.train`;
    * evaluation in eval mode: mIoU over the 11 classes (background included) and pixel accuracy
      on the test scenes, and on a fixed part of the training scenes (the train/test gap of eval
      mode); BN runs are also evaluated with recomputed population statistics (precise BN).

mIoU: with the confusion matrix ``C`` summed over all evaluated pixels (rows: truth, columns:
prediction), ``IoU_c = C_cc / (sum_j C_cj + sum_i C_ic - C_cc)`` and mIoU is the mean of
``IoU_c`` over the classes whose union is non-empty, in %.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbn.experiments.data import load_split, normalize
from cbn.experiments.norms import CROSS_ITERATION_OPTIONS, make_norm

NUM_CLASSES = 11  # background + the 10 Fashion-MNIST classes
NormFactory = Callable[[int], nn.Module]


# ----------------------------------------------------------------------------- scenes


def compose_scenes(
    images: Tensor,
    labels: Tensor,
    n_scenes: int,
    canvas: int = 64,
    objects: tuple[int, int] = (1, 3),
    seed: int = 0,
    threshold: int = 16,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paste Fashion-MNIST objects on black canvases; exact per-pixel class masks.

    Scene ``i`` holds ``n_i`` objects, ``n_i`` uniform in ``[objects[0], objects[1]]``; each object
    is a uniformly drawn image of ``images``, pasted whole at a uniform position. Only the
    object's foreground pixels (value >= ``threshold``) are pasted, and a later object overwrites
    an earlier one where they overlap, so that, exactly::

        mask[p] = label + 1 of the last object whose foreground covers p, else 0
        canvas[p] = that object's pixel value, else 0      (canvas[p] > 0  <=>  mask[p] > 0)

    Deterministic given ``seed`` (its own ``torch.Generator``).

    Args:
        images: ``(N, 1, s, s)`` uint8 objects.
        labels: ``(N,)`` int64 classes in ``0..9``.
        n_scenes: scenes to compose.
        canvas: side of the square canvas (>= s).
        objects: inclusive range of the number of objects per scene.
        seed: generator seed.
        threshold: smallest pixel value that counts as the object's foreground.

    Returns:
        ``(scenes, masks, counts)``: ``(n_scenes, 1, canvas, canvas)`` uint8,
        ``(n_scenes, canvas, canvas)`` int64 in ``0..10``, ``(n_scenes,)`` objects per scene.

    Example::

        >>> scenes, masks, counts = compose_scenes(images, labels, 100, canvas=64, seed=0)
    """
    side = images.shape[-1]
    if canvas < side:
        raise ValueError(f"canvas {canvas} smaller than the objects ({side})")
    low, high = objects
    if not 0 <= low <= high:
        raise ValueError(f"objects must be a range 0 <= low <= high, got {objects}")
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(low, high + 1, (n_scenes,), generator=generator)
    scenes = torch.zeros(n_scenes, 1, canvas, canvas, dtype=torch.uint8)
    masks = torch.zeros(n_scenes, canvas, canvas, dtype=torch.int64)
    total = int(counts.sum())
    picks = torch.randint(0, len(images), (total,), generator=generator)
    rows = torch.randint(0, canvas - side + 1, (total,), generator=generator)
    cols = torch.randint(0, canvas - side + 1, (total,), generator=generator)
    k = 0
    for i, count in enumerate(counts.tolist()):
        for _ in range(count):
            obj = images[picks[k], 0]
            foreground = obj >= threshold
            r, c = int(rows[k]), int(cols[k])
            scenes[i, 0, r : r + side, c : c + side][foreground] = obj[foreground]
            masks[i, r : r + side, c : c + side][foreground] = int(labels[picks[k]]) + 1
            k += 1
    return scenes, masks, counts


def vary_photometry(scenes: Tensor, strength: float, seed: int) -> Tensor:
    """Give every scene its own contrast and background level: ``out = level + contrast * scene``.

    Per scene, ``contrast`` is uniform in ``[1 - strength, 1]`` and ``level`` uniform in
    ``[0, (1 - contrast) * 255]``, so values stay in ``0..255`` and an object pixel stays brighter
    than the background. This is the between-image variation of camera exposure that makes a
    batch's statistics differ from the population's: normalizing with the statistics of one or two
    scenes removes it in training, while the running statistics used in evaluation do not. The
    masks are unchanged (they come from the composition, not from the pixel values).

    Args:
        scenes: ``(N, 1, H, W)`` uint8 canvases.
        strength: in ``[0, 1)``; 0 returns ``scenes`` unchanged.
        seed: generator seed (its own ``torch.Generator``).

    Returns:
        ``(N, 1, H, W)`` uint8.

    Example::

        >>> varied = vary_photometry(scenes, 0.8, seed=0)
    """
    if not 0.0 <= strength < 1.0:
        raise ValueError(f"photometric strength must be in [0, 1), got {strength}")
    if strength == 0.0:
        return scenes
    generator = torch.Generator().manual_seed(seed)
    n = scenes.shape[0]
    contrast = 1.0 - strength * torch.rand(n, generator=generator, dtype=torch.float64)
    level = (1.0 - contrast) * 255.0 * torch.rand(n, generator=generator, dtype=torch.float64)
    varied = level.view(n, 1, 1, 1) + contrast.view(n, 1, 1, 1) * scenes.double()
    return varied.round().clamp(0, 255).to(torch.uint8)


@dataclass
class Scenes:
    """Composed training and test scenes (uint8 canvases, int64 masks)."""

    train_images: Tensor
    train_masks: Tensor
    test_images: Tensor
    test_masks: Tensor

    @classmethod
    def build(cls, cfg: "SegConfig") -> "Scenes":
        """Training scenes from the training split (seed ``scene_seed``), test scenes from the test
        split (seed ``scene_seed + 1``); the same for every run with the same scene options. With
        ``cfg.photometric > 0`` each scene gets its own contrast and background level
        (:func:`vary_photometry`)."""
        train_images, train_labels = load_split("train", cfg.data_dir)
        test_images, test_labels = load_split("test", cfg.data_dir)
        objects = (cfg.objects_min, cfg.objects_max)
        train = compose_scenes(train_images, train_labels, cfg.train_scenes, cfg.canvas, objects, cfg.scene_seed)
        test = compose_scenes(test_images, test_labels, cfg.test_scenes, cfg.canvas, objects, cfg.scene_seed + 1)
        train_images = vary_photometry(train[0], cfg.photometric, cfg.scene_seed + 2)
        test_images = vary_photometry(test[0], cfg.photometric, cfg.scene_seed + 3)
        return cls(train_images, train[1], test_images, test[1])


# ----------------------------------------------------------------------------- model


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2; the convolutions have no bias (the norm has one)."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormFactory) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), norm(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm(out_channels), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A small U-Net with a pluggable norm: ``2 * (2 * len(widths) - 1)`` norm layers.

    Args:
        norm: ``norm(num_channels) -> nn.Module``, e.g. ``nn.BatchNorm2d``.
        widths: channels per level, finest first; the last level is the bottleneck at
            ``1 / 2**(len(widths) - 1)`` of the input side.
        in_channels: input channels.
        num_classes: scores per pixel.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`, ``H`` and ``W`` divisible by ``2**(len(widths) - 1)``
        - Output: :math:`(N, \\text{num\\_classes}, H, W)`

    Example::

        >>> UNet(nn.BatchNorm2d)(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 11, 64, 64])
    """

    def __init__(self, norm: NormFactory | None = None, widths: tuple[int, ...] = (16, 32, 64),
                 in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        norm = norm or nn.BatchNorm2d
        self.down = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.down.append(DoubleConv(channels, width, norm))
            channels = width
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.upsample.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            self.up.append(DoubleConv(2 * width, width, norm))
            channels = width
        self.head = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the bottleneck's own output
        for upsample, block in zip(self.upsample, self.up):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)


class FCN(nn.Module):
    """A small fully convolutional network with skip scores (FCN-8s style, Long et al., 2015).

    An encoder of ``DoubleConv`` levels (2x2 max pooling between them) and, at every level, a 1x1
    convolution to class scores; the scores of each level are upsampled (bilinear) to the input
    size and summed. The coarsest level sees whole objects (the class), the finest the outline.

    Args:
        norm: ``norm(num_channels) -> nn.Module``.
        widths: channels per level, finest first.
        in_channels: input channels.
        num_classes: scores per pixel.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`, ``H`` and ``W`` divisible by ``2**(len(widths) - 1)``
        - Output: :math:`(N, \\text{num\\_classes}, H, W)`

    Example::

        >>> FCN(nn.BatchNorm2d)(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 11, 64, 64])
    """

    def __init__(self, norm: NormFactory | None = None, widths: tuple[int, ...] = (16, 32, 64),
                 in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        norm = norm or nn.BatchNorm2d
        self.down = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.down.append(DoubleConv(channels, width, norm))
            channels = width
        self.pool = nn.MaxPool2d(2)
        self.scores = nn.ModuleList(nn.Conv2d(w, num_classes, 1) for w in widths)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.out_channels != num_classes:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        out = None
        for index, (block, score) in enumerate(zip(self.down, self.scores)):
            x = block(x if index == 0 else self.pool(x))
            s = score(x)
            s = s if index == 0 else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            out = s if out is None else out + s
        return out


ARCHITECTURES = {"unet": UNet, "fcn": FCN}


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A normalization method of the study: how the same U-Net gets its norms.

    ``kind`` is a kind of :func:`cbn.experiments.norms.make_norm` (bn, brn, gn, syncbn), or
    ``cbn``: the network is built with BatchNorm and converted by ``cbn.convert_model(net,
    window=..., burnin=..., **convert)``. ``nproc`` > 1 runs that many processes (SyncBN), each
    with ``batch_size`` scenes. A new variant is one entry of :data:`METHODS` (or ``--method``).
    """

    kind: str
    convert: dict = field(default_factory=dict)
    nproc: int = 1
    label: str = ""
    init: str | None = None  # fine-tuning (cfg.pretrained): None all pretrained entries, "conv", "scratch"


METHODS: dict[str, Method] = {
    "bn": Method("bn", label="BN"),
    "gn": Method("gn", label="GN"),
    "brn": Method("brn", label="BRN"),
    # The cross-iteration kinds convert with the options the classification experiments use.
    "naive": Method("cbn", dict(CROSS_ITERATION_OPTIONS["naive"]), label="naive CBN"),
    "cbn": Method("cbn", dict(CROSS_ITERATION_OPTIONS["cbn"]), label="CBN (paper rule)"),
    "cbn-diff": Method("cbn", dict(CROSS_ITERATION_OPTIONS["cbn-diff"]), label="CBN (differentiable)"),
    "syncbn": Method("syncbn", nproc=2, label="SyncBN (2 proc)"),
}


# ----------------------------------------------------------------------------- config


@dataclass
class SegConfig:
    method: str = "bn"
    batch_size: int = 2
    seed: int = 0
    # method spec (filled from METHODS by ``with_method``; the record is self-describing)
    kind: str = "bn"
    convert: dict = field(default_factory=dict)
    nproc: int = 1
    # scenes
    canvas: int = 64
    objects_min: int = 1
    objects_max: int = 3
    train_scenes: int = 1000
    test_scenes: int = 300
    scene_seed: int = 0
    photometric: float = 0.0  # per-scene contrast / background variation (vary_photometry)
    flip: bool = True
    # fine-tuning (cbn.experiments.finetune): pretrained encoder weights, relative to the working
    # directory, and what to load of them (None: every entry the model has; "conv"; "scratch")
    pretrained: str | None = None
    init: str | None = None
    # model
    arch: str = "unet"
    widths: tuple = (16, 32, 64)
    # optimization
    images: int = 4000  # training scenes seen, at every batch size
    base_lr: float = 0.05
    ref_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn_momentum: float = 0.1
    gn_groups: int = 8
    window_cap: int = 16
    window: int | None = None  # None: protocol rule
    burnin_fraction: float = 0.25
    # evaluation
    eval_points: int = 4  # test evaluations during training (the last one is at the end)
    eval_batch: int = 50
    train_eval_scenes: int = 200
    precise_bn_scenes: int = 200  # BN runs only (0: none)
    # bookkeeping
    data_dir: str | None = None
    out: str | None = None
    progress: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)

    def run_name(self) -> str:
        return f"{self.method}_bs{self.batch_size}_seed{self.seed}"

    def with_method(self, name: str, method: Method | None = None) -> "SegConfig":
        """A copy set to method ``name`` (from :data:`METHODS` unless ``method`` is given)."""
        method = method or METHODS[name]
        return replace(self, method=name, kind=method.kind, convert=dict(method.convert), nproc=method.nproc,
                       init=method.init)


def resolve_protocol(cfg: SegConfig) -> dict:
    """Every derived choice of a run: global batch, steps, lr, window, burn-in, BRN ramps."""
    nproc = cfg.nproc if cfg.kind == "syncbn" else 1
    global_batch = cfg.batch_size * nproc
    total_steps = max(1, cfg.images // global_batch)
    window = cfg.window if cfg.window is not None else min(cfg.window_cap, max(1, cfg.ref_batch // cfg.batch_size))
    burnin = int(round(cfg.burnin_fraction * total_steps))
    return {
        "nproc": nproc,
        "global_batch": global_batch,
        "total_steps": total_steps,
        "images_seen": total_steps * global_batch,
        "lr": cfg.base_lr * global_batch / cfg.ref_batch,
        "lr_rule": f"linear: base_lr * global_batch / {cfg.ref_batch}",
        "schedule": "cosine to 0 over total_steps, no warm-up",
        "window": window,
        "burnin": burnin,
        "brn_warmup_steps": burnin,
        "brn_rmax_ramp_steps": int(round(0.40 * total_steps)),
        "brn_dmax_ramp_steps": int(round(0.25 * total_steps)),
        "brn_rmax": 3.0,
        "brn_dmax": 5.0,
        "eval_steps": sorted({max(1, int(round(total_steps * (i + 1) / max(1, cfg.eval_points))))
                              for i in range(max(1, cfg.eval_points))}),
    }


def build_segmentation_model(cfg: SegConfig, proto: dict, process_group=None) -> nn.Module:
    """The U-Net with every norm of the run's method (seeded by ``cfg.seed``: same conv weights
    for every method). With ``cfg.pretrained`` (or a kind of the fine-tuning study: frozen-bn,
    mabn) the model comes from :func:`cbn.experiments.finetune.build_finetune_model`."""
    if cfg.pretrained or cfg.kind in ("frozen-bn", "mabn"):
        from cbn.experiments.finetune import build_finetune_model

        return build_finetune_model(cfg, proto, process_group)
    torch.manual_seed(cfg.seed)
    if cfg.kind == "cbn":
        import cbn

        net = ARCHITECTURES[cfg.arch](lambda c: nn.BatchNorm2d(c, momentum=cfg.bn_momentum), cfg.widths)
        return cbn.convert_model(net, window=proto["window"], burnin=proto["burnin"], **cfg.convert)
    norm = make_norm(
        cfg.kind, momentum=cfg.bn_momentum, gn_groups=cfg.gn_groups, process_group=process_group,
        rmax=proto["brn_rmax"], dmax=proto["brn_dmax"], warmup_steps=proto["brn_warmup_steps"],
        rmax_ramp_steps=proto["brn_rmax_ramp_steps"], dmax_ramp_steps=proto["brn_dmax_ramp_steps"],
    )
    return ARCHITECTURES[cfg.arch](norm, cfg.widths)


# ----------------------------------------------------------------------------- evaluation


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """``C[i, j]`` = pixels of true class ``i`` predicted as ``j`` (int64, ``(K, K)``)."""
    index = target.reshape(-1) * num_classes + prediction.reshape(-1)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_scores(confusion: Tensor) -> dict:
    """Per-class IoU, mIoU and pixel accuracy (in %) from a confusion matrix.

    ``IoU_c = C_cc / (row_c + col_c - C_cc)``; mIoU averages the classes with a non-empty union.
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = torch.where(present, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))
    return {
        "miou": 100.0 * float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "pixel_acc": 100.0 * float(true_positive.sum() / confusion.sum().clamp_min(1)),
        "iou": [100.0 * float(v) for v in iou],
    }


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, masks: Tensor, batch_size: int = 50) -> dict:
    """mIoU, pixel accuracy, per-class IoU and mean loss of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    loss_sum = 0.0
    for start in range(0, len(images), batch_size):
        logits = model(normalize(images[start : start + batch_size]))
        target = masks[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        confusion += confusion_matrix(logits.argmax(1), target)
    model.train(was_training)
    scores = iou_scores(confusion)
    scores["loss"] = loss_sum / max(1, masks.numel())
    return scores


def has_running_stats(model: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _NormBase

    return any(isinstance(m, _NormBase) and m.track_running_stats for m in model.modules())


# ----------------------------------------------------------------------------- training


def training_batches(scenes: Scenes, global_batch: int, total_steps: int, seed: int, flip: bool):
    """``total_steps`` batches of ``(normalized images, masks)``: passes over the training scenes,
    each in an order drawn from ``(seed, pass)``, with per-scene horizontal flips."""
    n = len(scenes.train_images)
    steps = 0
    epoch = 0
    while steps < total_steps:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        for start in range(0, n - global_batch + 1, global_batch):
            if steps == total_steps:
                return
            idx = order[start : start + global_batch]
            x, y = scenes.train_images[idx], scenes.train_masks[idx]
            if flip:
                f = flips[start : start + global_batch]
                x = torch.where(f[:, None, None, None], x.flip(-1), x)
                y = torch.where(f[:, None, None], y.flip(-1), y)
            yield normalize(x), y
            steps += 1
        epoch += 1


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _worker(rank: int, cfg: SegConfig, rendezvous: str | None, result_path: str | None) -> dict | None:
    """Training body; ranks > 0 exist only for multi-process methods (SyncBN)."""
    from cbn.experiments.precise_bn import recompute_population_statistics
    from cbn.experiments.train import source_commit

    torch.set_num_threads(cfg.threads)
    wall0 = time.perf_counter()
    proto = resolve_protocol(cfg)
    nproc = proto["nproc"]
    group = None
    if nproc > 1:
        import torch.distributed as dist
        from datetime import timedelta

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=nproc,
                                timeout=timedelta(minutes=30))
        group = dist.group.WORLD
    scenes = Scenes.build(cfg)
    model = build_segmentation_model(cfg, proto, group)
    optimizer = torch.optim.SGD(model.parameters(), lr=proto["lr"], momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    total = proto["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    is_main = rank == 0
    record = {"name": cfg.run_name(), "config": asdict(cfg), "protocol": proto, "torch": torch.__version__,
              "commit": source_commit(), "curve": [], "diverged": False,
              "scenes": "composed: Fashion-MNIST objects pasted on black canvases (compose_scenes)"}
    train_eval = (scenes.train_images[: cfg.train_eval_scenes], scenes.train_masks[: cfg.train_eval_scenes])
    eval_steps = set(proto["eval_steps"])
    report_every = max(1, total // 10)
    loss_sum, loss_count, train_time, step = 0.0, 0, 0.0, 0
    t_start = time.perf_counter()
    model.train()
    for x, y in training_batches(scenes, proto["global_batch"], total, cfg.seed, cfg.flip):
        t0 = time.perf_counter()
        if nproc > 1:
            x, y = x[rank * cfg.batch_size : (rank + 1) * cfg.batch_size], y[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if nproc > 1:  # data-parallel: average the gradients in one all-reduce
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat.div_(nproc)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        optimizer.step()
        scheduler.step()
        step += 1
        train_time += time.perf_counter() - t0
        value = loss.item()
        if step == 1 and is_main and cfg.kind == "cbn":
            from cbn.pairing import pairing_report, pairing_summary

            record["pairing"] = pairing_summary(pairing_report(model))
        if not math.isfinite(value):
            record["diverged"] = True
            break
        loss_sum += value
        loss_count += 1
        if is_main and step in eval_steps:
            scores = evaluate(model, scenes.test_images, scenes.test_masks, cfg.eval_batch)
            record["curve"].append({"step": step, "images": step * proto["global_batch"],
                                    "train_loss": loss_sum / max(1, loss_count), "test_miou": scores["miou"],
                                    "test_pixel_acc": scores["pixel_acc"], "test_loss": scores["loss"],
                                    "train_seconds": train_time})
            loss_sum, loss_count = 0.0, 0
        if is_main and cfg.progress and (step % report_every == 0 or step == total):
            elapsed = time.perf_counter() - t_start
            last = record["curve"][-1] if record["curve"] and record["curve"][-1]["step"] == step else None
            extra = f"  test mIoU {last['test_miou']:.2f}" if last else ""
            print(f"[{cfg.run_name()}] step {step}/{total} ({100 * step // total}%)  loss {value:.3f}{extra}  "
                  f"{_format_seconds(elapsed)} elapsed, ETA {_format_seconds(elapsed * (total - step) / step)}",
                  flush=True)
    if nproc > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not is_main:
        return None
    record["steps"] = step
    if getattr(model, "pretrained_info", None) is not None:
        record["pretrained"] = model.pretrained_info
    from cbn.experiments.finetune import environment

    record["environment"] = environment(model)
    record["train_seconds"] = train_time
    record["step_ms"] = 1000.0 * train_time / max(1, step)
    nan = float("nan")
    if record["diverged"]:
        record.update(test_miou=nan, test_pixel_acc=nan, train_miou=nan, train_pixel_acc=nan)
    else:
        test = evaluate(model, scenes.test_images, scenes.test_masks, cfg.eval_batch)
        train = evaluate(model, *train_eval, cfg.eval_batch)
        record.update(test_miou=test["miou"], test_pixel_acc=test["pixel_acc"], test_iou=test["iou"],
                      train_miou=train["miou"], train_pixel_acc=train["pixel_acc"])
        if cfg.precise_bn_scenes and cfg.kind == "bn" and has_running_stats(model):
            t0 = time.perf_counter()
            frozen = copy.deepcopy(model)
            layers = recompute_population_statistics(
                frozen, normalize(scenes.train_images[: cfg.precise_bn_scenes]), cfg.eval_batch)
            p_test = evaluate(frozen, scenes.test_images, scenes.test_masks, cfg.eval_batch)
            p_train = evaluate(frozen, *train_eval, cfg.eval_batch)
            record["precise_bn"] = {"test_miou": p_test["miou"], "test_pixel_acc": p_test["pixel_acc"],
                                    "train_miou": p_train["miou"], "train_pixel_acc": p_train["pixel_acc"],
                                    "scenes": cfg.precise_bn_scenes, "layers": layers,
                                    "seconds": time.perf_counter() - t0}
    record["wall_seconds"] = time.perf_counter() - wall0
    if is_main and cfg.progress:
        print(f"[{cfg.run_name()}] done: test mIoU {record['test_miou']:.2f}  pixel acc {record['test_pixel_acc']:.2f}  "
              f"train mIoU (eval mode) {record['train_miou']:.2f}  {_format_seconds(record['wall_seconds'])}",
              flush=True)
    if result_path:
        Path(result_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(result_path) + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=float))
        tmp.replace(result_path)  # atomic: a record present means a finished run
    return record


def _spawn_entry(rank: int, cfg: SegConfig, rendezvous: str, result_path: str | None) -> None:
    _worker(rank, cfg, rendezvous, result_path)


def result_path(cfg: SegConfig) -> Path | None:
    return Path(cfg.out) / f"{cfg.run_name()}.json" if cfg.out else None


def train(cfg: SegConfig) -> dict:
    """Run one configuration; returns the JSON record (also written under ``cfg.out`` if set)."""
    path = result_path(cfg)
    nproc = cfg.nproc if cfg.kind == "syncbn" else 1
    if nproc <= 1:
        return _worker(0, cfg, None, str(path) if path else None)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="cbn-seg-") as directory:
        target = str(path) if path else os.path.join(directory, "record.json")
        mp.spawn(_spawn_entry, args=(cfg, os.path.join(directory, "rendezvous"), target), nprocs=nproc, join=True)
        return json.loads(Path(target).read_text())


def config_from_json(values: dict) -> SegConfig:
    return SegConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """``python -m cbn.experiments.segmentation CONFIG.json``: one run from a saved SegConfig."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cbn.experiments.segmentation CONFIG.json", file=sys.stderr)
        return 2
    record = train(config_from_json(json.loads(Path(argv[0]).read_text())))
    print(json.dumps({"name": record["name"], "test_miou": record["test_miou"], "diverged": record["diverged"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
