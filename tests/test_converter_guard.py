"""Frameworks' BatchNorm converters replacing CBN layers are refused at the next training forward."""

import copy
import functools

import pytest
import timm
import torch
from mmengine.model import convert_sync_batchnorm as mmengine_convert_sync_batchnorm
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn

import cbn


def _model():
    return cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                           nn.BatchNorm2d(4)), window=2)


def _train_step(model):
    model(torch.randn(2, 3, 6, 6)).sum().backward()


@pytest.mark.parametrize("converter,names", [
    (torch.nn.SyncBatchNorm.convert_sync_batchnorm, ["torch.nn.SyncBatchNorm.convert_sync_batchnorm", "Lightning"]),
    (TorchSyncBatchNorm().apply, ["torch.nn.SyncBatchNorm.convert_sync_batchnorm", "Trainer(sync_batchnorm=True)"]),
    (mmengine_convert_sync_batchnorm, ["mmengine's convert_sync_batchnorm"]),
])
def test_sync_batchnorm_converters_are_named_with_the_right_order(converter, names):
    model = _model()
    _train_step(model)
    model = converter(model)
    assert type(model[1]) is nn.SyncBatchNorm  # the converter did replace it
    with pytest.raises(RuntimeError, match=r"2 by torch\.nn\.modules\.batchnorm\.SyncBatchNorm \(1, 4\)") as error:
        _train_step(model)
    for name in [*names, "cbn.convert_model(model, process_group=torch.distributed.group.WORLD)", "cbn.revert_model"]:
        assert name in str(error.value)


def test_timms_converter_on_a_timm_model_built_with_cbn_is_named():
    model = timm.create_model("mobilenetv2_050", num_classes=3,
                              norm_layer=functools.partial(cbn.CrossIterationBatchNorm2d, window=2))
    model = cbn.convert_model(model)
    model = timm_convert_sync_batchnorm(model)
    with pytest.raises(RuntimeError, match=r"timm\.layers\.convert_sync_batchnorm \(timm's train\.py --sync-bn\)") as error:
        model(torch.randn(2, 3, 32, 32))
    # timm's converter keeps the activation as a child SyncBatchNorm never calls: said too.
    assert "52 by torch.nn.modules.batchnorm.SyncBatchNorm (bn1 (its activation no longer runs)" in str(error.value)


def test_eval_revert_first_and_model_surgery_are_not_refused():
    model = _model()
    clobbered = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    clobbered.eval()(torch.randn(2, 3, 6, 6))  # eval: running statistics, as CBN's eval
    # The copy's guard watches the copy: the original still trains.
    _train_step(model)
    with pytest.raises(RuntimeError, match=r"2 by torch\.nn\.modules\.batchnorm\.SyncBatchNorm \(1, 4\)"):
        _train_step(clobbered.train())
    # The right order for SyncBatchNorm instead of CBN: revert first.
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(cbn.revert_model(_model()))
    assert not any(isinstance(m, cbn.CrossIterationBatchNormBase) for m in synced.modules())
    # Replacing a layer by something that is not a BatchNorm is the user's surgery.
    model[4] = nn.Identity()
    _train_step(model)
    _train_step(model)
