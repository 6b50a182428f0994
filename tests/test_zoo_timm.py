"""timm's zoo: every BatchNorm kind converted, pairing checked, revert exact (see tests/zoo.py).

The models cover timm's norm kinds and block types at small sizes (``pretrained=False``): plain
``nn.BatchNorm2d`` and timm's ``BatchNormAct2d`` (norm + drop + act in one ``nn.BatchNorm2d``
subclass) behind plain, depthwise, grouped, mixed-kernel (MixNet) and "same"-padded
convolutions, squeeze-excitation, CSP and dual-path (DPN, pre-activation norms after a
concatenation) blocks, Inception branches, re-parameterizable RepVGG/MobileOne branches (an
identity-branch norm on the block input), MobileViT's convolution + transformer blocks, LeViT's
norms on linear layers (on reshaped linear outputs), and timm's ``SyncBatchNormAct`` (from
``timm.layers.convert_sync_batchnorm``). Classifiers are trained with cross-entropy on the
scenes' first item label.
"""

import pytest
import timm
import torch
from torch import nn

from zoo import check_model, scenes

SIZE = 64
BATCH = 2


def _sync(name: str, **kwargs):
    def make():
        return timm.layers.convert_sync_batchnorm(timm.create_model(name, pretrained=False, **kwargs))
    return make


def _timm(name: str, **kwargs):
    def make():
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return make


MODELS = {
    "efficientnet_b0": (_timm("efficientnet_b0"), SIZE),
    "mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), SIZE),
    "regnetx_002": (_timm("regnetx_002"), SIZE),
    "cs3darknet_s": (_timm("cs3darknet_s"), SIZE),
    "dpn48b": (_timm("dpn48b"), SIZE),
    "mixnet_s": (_timm("mixnet_s"), SIZE),
    "inception_v3": (_timm("inception_v3"), 96),
    "repvgg_a0": (_timm("repvgg_a0"), SIZE),
    "mobileone_s0": (_timm("mobileone_s0"), SIZE),
    "lcnet_050_sync": (_sync("lcnet_050", num_classes=10), SIZE),
    "mobilevit_xxs": (_timm("mobilevit_xxs"), SIZE),
    "levit_128s": (_timm("levit_128s", img_size=SIZE), SIZE),
    "tresnet_m": (_timm("tresnet_m"), SIZE),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_converts_trains_pairs_and_reverts(name):
    make, size = MODELS[name]
    batches = [scenes(BATCH, size, seed=step) for step in range(4)]
    eval_images, _ = scenes(BATCH, size, seed=100)

    def train_loss(model, step):
        images, targets = batches[step]
        labels = torch.stack([t["labels"][0] - 1 for t in targets])
        return nn.functional.cross_entropy(model(images), labels)

    counts = check_model(make, train_loss, lambda model: model(eval_images))
    print(name, counts)
