"""Composed detection and instance-segmentation scenes made of Fashion-MNIST objects.

THE SCENES ARE COMPOSED, not photographs: each scene is a black canvas on which a few real
Fashion-MNIST images (28x28 grey-level clothing items, 10 classes) are pasted at random places
and scales, without overlap. Because the composer places every object itself, each object's box
and instance mask are exact, not annotated by hand:

- an object's **mask** is the set of canvas pixels it painted with a nonzero value (Fashion-MNIST
  backgrounds are exactly 0, so the nonzero pixels of an image are the item);
- its **box** is the tightest box around its mask, ``(x1, y1, x2, y2)`` in pixel-edge coordinates
  as torchvision's detection models take them: the object covers columns ``x1 .. x2 - 1`` and rows
  ``y1 .. y2 - 1``, so ``x2 - x1`` is its width in pixels.

Boxes never overlap one another (so no object hides another's pixels) and never leave the canvas.
Everything is deterministic given ``seed``.

Example::

    >>> from cbn.experiments.data import load_split
    >>> images, labels = load_split("test")
    >>> scenes = compose_scenes(images, labels, n_scenes=100, canvas=128, objects=(2, 4), seed=0)
    >>> scenes.canvases.shape, scenes.boxes[0].shape, scenes.masks[0].shape
    (torch.Size([100, 1, 128, 128]), torch.Size([k, 4]), torch.Size([k, 128, 128]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Scenes(NamedTuple):
    """Composed scenes; per scene ``i`` the object lists have ``k_i`` rows, one per object.

    Attributes:
        canvases: uint8 ``(N, 1, H, W)``, 0 where no object is.
        boxes: list of N float32 ``(k_i, 4)`` tensors, ``(x1, y1, x2, y2)`` tight, pixel edges.
        labels: list of N int64 ``(k_i,)`` tensors, the Fashion-MNIST classes (0-9).
        masks: list of N bool ``(k_i, H, W)`` tensors, the pixels each object painted.
        sources: list of N int64 ``(k_i,)`` tensors, the index of each object's source image.
    """

    canvases: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    masks: list[Tensor]
    sources: list[Tensor]


def tight_box(mask: Tensor) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` of the nonzero pixels of a 2-D ``mask``, pixel edges (``x2`` exclusive).

    Raises:
        ValueError: when ``mask`` has no nonzero pixel.
    """
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if len(rows) == 0:
        raise ValueError("an empty image has no box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def scaled_object(image: Tensor, scale: float) -> Tensor:
    """The item of one ``(H, W)`` uint8 image, cropped to its nonzero pixels and resized by ``scale``.

    Resizing is bilinear with antialiasing (uint8 in, uint8 out, rounded); the result is cropped
    again to its nonzero pixels, which resampling can move by a pixel, so the returned patch is
    always tight: its first and last rows and columns each hold a nonzero pixel.
    """
    x1, y1, x2, y2 = tight_box(image)
    patch = image[y1:y2, x1:x2]
    if scale != 1.0:
        size = (max(1, round(patch.shape[0] * scale)), max(1, round(patch.shape[1] * scale)))
        resized = F.interpolate(patch[None, None].float(), size=size, mode="bilinear", antialias=True,
                                align_corners=False)
        patch = resized[0, 0].round().clamp(0, 255).to(torch.uint8)
        x1, y1, x2, y2 = tight_box(patch)
        patch = patch[y1:y2, x1:x2]
    return patch


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]], gap: int) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] + gap and b[0] < x2 + gap and y1 < b[3] + gap and b[1] < y2 + gap for b in placed)


def _place(patches: list[Tensor], canvas: int, gap: int, generator: torch.Generator,
           tries: int) -> list[tuple[int, int, int, int]] | None:
    """Boxes for ``patches`` placed one after the other, each drawn uniformly until it keeps
    ``gap`` pixels from those before it; None when one fails ``tries`` times."""
    placed: list[tuple[int, int, int, int]] = []
    for patch in patches:
        h, w = patch.shape
        for _ in range(tries):
            top = int(torch.randint(0, canvas - h + 1, (), generator=generator))
            left = int(torch.randint(0, canvas - w + 1, (), generator=generator))
            box = (left, top, left + w, top + h)
            if not _overlaps(box, placed, gap):
                placed.append(box)
                break
        else:
            return None
    return placed


def compose_scenes(
    images: Tensor,
    labels: Tensor,
    n_scenes: int,
    canvas: int = 128,
    objects: tuple[int, int] = (2, 4),
    scale: tuple[float, float] = (1.0, 1.6),
    gap: int = 1,
    seed: int = 0,
    max_tries: int = 200,
) -> Scenes:
    """Compose ``n_scenes`` scenes of ``objects[0]``-``objects[1]`` Fashion-MNIST items each.

    THE SCENES ARE COMPOSED (see the module docstring): per scene, draw the object count uniformly
    in ``objects`` (inclusive), then per object a source image uniformly from ``images``, a scale
    uniformly in ``scale``; then place the objects in turn, each at a position drawn uniformly
    among those that keep it inside the canvas, redrawn until its box is at least ``gap`` pixels
    from every box already placed (and, if an object finds no room, all positions of the scene
    are drawn again). Objects never overlap, so each mask is exactly the object's own painted pixels
    and the canvas equals the sum of the placed patches.

    Args:
        images: uint8 ``(M, 1, 28, 28)`` or ``(M, 28, 28)`` source images (0 = background); every
            image needs at least one nonzero pixel.
        labels: int64 ``(M,)`` their classes.
        n_scenes: how many scenes.
        canvas: side of the square canvas in pixels.
        objects: ``(min, max)`` objects per scene, inclusive.
        scale: ``(min, max)`` resize factor of the tight-cropped items.
        gap: least empty pixels between two boxes (0 lets boxes touch, never overlap).
        seed: the whole output is a function of the inputs and ``seed``.
        max_tries: positions drawn per object, and placements per scene, before giving up.

    Returns:
        :class:`Scenes`: ``canvases`` uint8 ``(N, 1, canvas, canvas)``; per scene ``boxes``
        float32 ``(k, 4)`` (x1, y1, x2, y2, tight, pixel edges), ``labels`` int64 ``(k,)``,
        ``masks`` bool ``(k, canvas, canvas)``, ``sources`` int64 ``(k,)`` indices into ``images``.

    Raises:
        ValueError: on bad arguments, or when an object cannot be placed (canvas too small for
            the object count and scale).
    """
    if images.dim() == 4:
        if images.shape[1] != 1:
            raise ValueError(f"images must have one channel, got shape {tuple(images.shape)}")
        images = images[:, 0]
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (M, H, W) or (M, 1, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    low, high = objects
    if not 1 <= low <= high:
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {objects}")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
    generator = torch.Generator().manual_seed(seed)

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=generator))

    canvases = torch.zeros(n_scenes, 1, canvas, canvas, dtype=torch.uint8)
    all_boxes, all_labels, all_masks, all_sources = [], [], [], []
    for scene in range(n_scenes):
        count = int(torch.randint(low, high + 1, (), generator=generator))
        sources = [int(torch.randint(0, images.shape[0], (), generator=generator)) for _ in range(count)]
        patches = [scaled_object(images[s], uniform(*scale)) for s in sources]
        for patch in patches:
            if max(patch.shape) > canvas:
                raise ValueError(f"an object of {tuple(patch.shape)} pixels does not fit a {canvas}-pixel canvas")
        # Greedy placement can paint itself into a corner; then the scene's positions are all
        # drawn again (same objects), up to max_tries times.
        for _ in range(max_tries):
            placed = _place(patches, canvas, gap, generator, max_tries)
            if placed is not None:
                break
        else:
            raise ValueError(
                f"scene {scene}: could not place {count} objects without overlap in {max_tries} tries; "
                "use a larger canvas, fewer objects or a smaller scale")
        masks = []
        for patch, (left, top, right, bottom) in zip(patches, placed):
            canvases[scene, 0, top:bottom, left:right] = patch
            mask = torch.zeros(canvas, canvas, dtype=torch.bool)
            mask[top:bottom, left:right] = patch > 0
            masks.append(mask)
        all_boxes.append(torch.tensor(placed, dtype=torch.float32).reshape(-1, 4))
        all_sources.append(torch.tensor(sources, dtype=torch.int64))
        all_labels.append(labels[all_sources[-1]].to(torch.int64))
        all_masks.append(torch.stack(masks))
    return Scenes(canvases, all_boxes, all_labels, all_masks, all_sources)


def coco_ground_truth(scenes: Scenes, class_names: list[str] | None = None) -> dict:
    """The scenes' boxes as a COCO-format ground-truth dictionary (for ``pycocotools.coco.COCO``).

    Image ids are the scene indices, category ids the Fashion-MNIST classes plus 1 (COCO keeps 0
    for "no category"), annotation ids count from 1; ``bbox`` is ``[x, y, width, height]`` and
    ``area`` the mask's pixel count.
    """
    height, width = scenes.canvases.shape[-2:]
    names = class_names or [str(c) for c in range(10)]
    annotations = []
    for image_id, (boxes, labels, masks) in enumerate(zip(scenes.boxes, scenes.labels, scenes.masks)):
        for box, label, mask in zip(boxes.tolist(), labels.tolist(), masks):
            x1, y1, x2, y2 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum()), "iscrowd": 0,
            })
    return {
        "images": [{"id": i, "width": int(width), "height": int(height)} for i in range(len(scenes.boxes))],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(names)],
    }
