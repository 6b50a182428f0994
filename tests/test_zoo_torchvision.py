"""torchvision's zoo: every BatchNorm converted, pairing checked, revert exact (see tests/zoo.py).

Classifiers (ResNet, MobileNetV3, EfficientNet, RegNet, ShuffleNetV2), the detectors the paper
targets (Faster R-CNN v2, with BatchNorm in the FPN and in the convolutional box head as the
authors placed CBN, and Mask R-CNN) and a segmenter (DeepLabV3 with its ASPP pooling branch), all
with ``weights=None, weights_backbone=None`` (nothing downloaded), trained on composed scenes of
Fashion-MNIST items: cross-entropy on the first item's label, the detectors' own losses on the
items' exact boxes and masks, per-pixel cross-entropy on the items' masks.
"""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection, segmentation

from zoo import check_model, scenes

SIZE = 64
BATCH = 2
NUM_CLASSES = 11  # ten Fashion-MNIST classes and the background

# Few proposals and sampled boxes: the box and mask heads dominate a detector's step otherwise.
DETECTOR_OPTIONS = dict(
    weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=SIZE, max_size=SIZE,
    rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=32,
    rpn_post_nms_top_n_test=16, rpn_batch_size_per_image=32, box_batch_size_per_image=16,
    box_detections_per_img=8,
)

CLASSIFIERS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=10),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(weights=None, num_classes=10),
    "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10),
}
DETECTORS = {
    "fasterrcnn_resnet50_fpn_v2": lambda: detection.fasterrcnn_resnet50_fpn_v2(**DETECTOR_OPTIONS),
    "maskrcnn_resnet50_fpn": lambda: detection.maskrcnn_resnet50_fpn(**DETECTOR_OPTIONS),
}


def _batches(count=4):
    return [scenes(BATCH, SIZE, seed=step) for step in range(count)]


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_converts_trains_pairs_and_reverts(name):
    batches = _batches()
    eval_images, _ = scenes(BATCH, SIZE, seed=100)

    def train_loss(model, step):
        images, targets = batches[step]
        labels = torch.stack([t["labels"][0] - 1 for t in targets])
        return nn.functional.cross_entropy(model(images), labels)

    print(name, check_model(CLASSIFIERS[name], train_loss, lambda model: model(eval_images)))


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_converts_trains_pairs_and_reverts(name):
    batches = _batches()
    eval_images, _ = scenes(BATCH, SIZE, seed=100)

    def train_loss(model, step):
        images, targets = batches[step]
        return sum(model(list(images), targets).values())

    def evaluate(model):
        # The detections, and the FPN features before any score threshold (never empty).
        return model(list(eval_images)), model.backbone(eval_images)

    print(name, check_model(DETECTORS[name], train_loss, evaluate))


def test_segmenter_converts_trains_pairs_and_reverts():
    batches = _batches()
    eval_images, _ = scenes(BATCH, SIZE, seed=100)

    def train_loss(model, step):
        images, targets = batches[step]
        # Per-pixel class: the label of the last item covering the pixel, else background.
        pixels = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.long)
        for index, target in enumerate(targets):
            for mask, label in zip(target["masks"], target["labels"]):
                pixels[index][mask.bool()] = label
        return nn.functional.cross_entropy(model(images)["out"], pixels)

    def make():
        return segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                         num_classes=NUM_CLASSES)

    print("deeplabv3_mobilenet_v3_large", check_model(make, train_loss, lambda model: model(eval_images)))
