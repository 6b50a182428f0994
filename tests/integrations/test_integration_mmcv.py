"""mmcv / mmengine: norm_cfg=dict(type="CBN", ...) through build_norm_layer and ConvModule (real packages)."""

import pytest
import torch
from mmcv.cnn import ConvModule, build_norm_layer
from mmengine.registry import MODELS
from torch import nn

import cbn
import cbn.integrations.mmcv  # noqa: F401  (registers)


def test_build_norm_layer_makes_cbn_with_the_config_arguments():
    name, layer = build_norm_layer(dict(type="CBN", window=3, burnin=7, momentum=0.05, requires_grad=False), 8, 2)
    assert name == "bn2" and type(layer) is cbn.CrossIterationBatchNorm2d
    assert (layer.window, layer.burnin, layer.momentum, layer.eps) == (3, 7, 0.05, 1e-5)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    for key, expected in [("CBN1d", cbn.CrossIterationBatchNorm1d), ("CBN2d", cbn.CrossIterationBatchNorm2d),
                          ("CBN3d", cbn.CrossIterationBatchNorm3d)]:
        assert MODELS.get(key) is expected
        assert type(build_norm_layer(dict(type=key), 4)[1]) is expected
    with pytest.raises(ValueError, match="window"):
        build_norm_layer(dict(type="CBN", window=0), 4)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_modules_with_cbn_train_compensated(dims):
    norm_cfg = dict(type="CBN" if dims == 2 else "CBN3d", window=3)
    conv_cfg = None if dims == 2 else dict(type="Conv3d")
    model = nn.Sequential(
        ConvModule(2, 6, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        ConvModule(6, 6, 3, stride=2, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=dict(type="SiLU")),
        ConvModule(6, 4, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, order=("conv", "norm", "act")),
    )
    assert all(m.conv.bias is None and type(m.norm).__name__ == f"CrossIterationBatchNorm{dims}d" for m in model)
    model = cbn.convert_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn((2, 2) + (8,) * dims)
    for _ in range(4):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report = cbn.pairing_report(model)
    assert [row.producer for row in report] == ["0.conv", "1.conv", "2.conv"], cbn.format_pairing_report(report)
    assert all(row.compensated for row in report)
    assert all(m.norm.iterations == 4 for m in model)
    assert torch.isfinite(loss)
