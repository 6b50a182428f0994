"""The scene composer on real Fashion-MNIST test images, checked against numpy recomputations."""

import numpy as np
import pytest
import torch

from cbn.experiments.data import load_split
from cbn.experiments.scenes import coco_ground_truth, compose_scenes


@pytest.fixture(scope="module")
def fashion():
    images, labels = load_split("test")
    return images[:2000], labels[:2000]


def _nonzero_box(array: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2), x2/y2 exclusive, of the nonzero pixels of a 2-D array, by np.where."""
    ys, xs = np.where(array > 0)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.7, 1.8)])
def test_boxes_enclose_exactly_the_pixels_of_each_object_and_masks_match(fashion, scale):
    images, labels = fashion
    scenes = compose_scenes(images, labels, 40, canvas=112, objects=(1, 5), scale=scale, seed=3)
    assert scenes.canvases.shape == (40, 1, 112, 112) and scenes.canvases.dtype == torch.uint8
    counts = [len(b) for b in scenes.boxes]
    assert min(counts) >= 1 and max(counts) <= 5 and len(set(counts)) > 2
    for canvas, boxes, labs, masks, sources in zip(scenes.canvases, *scenes[1:]):
        canvas = canvas[0].numpy()
        masks = masks.numpy()
        assert masks.dtype == bool and masks.shape == (len(boxes), 112, 112)
        # The canvas is exactly the union of the objects, and no two objects share a pixel.
        assert np.array_equal(masks.any(0), canvas > 0)
        assert masks.sum(0).max() <= 1
        assert torch.equal(labs, labels[sources])
        for (x1, y1, x2, y2), mask, source in zip(boxes.int().tolist(), masks, sources.tolist()):
            assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112  # inside the canvas
            assert _nonzero_box(mask) == (x1, y1, x2, y2)  # tight around the mask
            # Inside its box the canvas's nonzero pixels are this object's alone (others keep out).
            assert np.array_equal(canvas[y1:y2, x1:x2] > 0, mask[y1:y2, x1:x2])
            sx1, sy1, sx2, sy2 = _nonzero_box(images[source, 0].numpy())
            if scale == (1.0, 1.0):
                # Unscaled, the box holds the source's tight crop, pixel for pixel.
                assert np.array_equal(canvas[y1:y2, x1:x2], images[source, 0, sy1:sy2, sx1:sx2].numpy())
            else:
                for side, source_side in ((x2 - x1, sx2 - sx1), (y2 - y1, sy2 - sy1)):
                    assert scale[0] * source_side - 2 <= side <= scale[1] * source_side + 1


def test_boxes_keep_the_gap(fashion):
    scenes = compose_scenes(*fashion, 30, canvas=128, objects=(4, 4), gap=3, seed=1)
    for boxes in scenes.boxes:
        for i in range(len(boxes)):
            for j in range(i):
                a, b = boxes[i], boxes[j]
                separated = (a[0] >= b[2] + 3 or b[0] >= a[2] + 3 or a[1] >= b[3] + 3 or b[1] >= a[3] + 3)
                assert separated, (a, b)


def test_same_seed_same_scenes_other_seed_other_scenes(fashion):
    first = compose_scenes(*fashion, 12, seed=7)
    again = compose_scenes(*fashion, 12, seed=7)
    other = compose_scenes(*fashion, 12, seed=8)
    assert torch.equal(first.canvases, again.canvases)
    for field in range(1, 5):
        assert all(torch.equal(a, b) for a, b in zip(first[field], again[field]))
    assert not torch.equal(first.canvases, other.canvases)


def test_impossible_or_bad_requests_raise(fashion):
    with pytest.raises(ValueError, match="could not place"):
        compose_scenes(*fashion, 1, canvas=40, objects=(6, 6), scale=(1.0, 1.0), seed=0, max_tries=20)
    with pytest.raises(ValueError, match="does not fit"):
        compose_scenes(*fashion, 1, canvas=20, objects=(1, 1), scale=(2.0, 2.0), seed=0)
    with pytest.raises(ValueError, match="objects"):
        compose_scenes(*fashion, 1, objects=(3, 2))
    with pytest.raises(ValueError, match="uint8"):
        compose_scenes(fashion[0].float(), fashion[1], 1)


def test_coco_ground_truth_matches_the_scenes(fashion):
    scenes = compose_scenes(*fashion, 6, seed=2)
    coco = coco_ground_truth(scenes)
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(1, sum(len(b) for b in scenes.boxes) + 1))
    expected = [(i, int(l) + 1, [x1, y1, x2 - x1, y2 - y1], int(m.sum()))
                for i, (bs, ls, ms) in enumerate(zip(scenes.boxes, scenes.labels, scenes.masks))
                for (x1, y1, x2, y2), l, m in zip(bs.tolist(), ls, ms)]
    assert [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in anns] == expected
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert len(coco["images"]) == 6 and coco["images"][0]["width"] == 128
