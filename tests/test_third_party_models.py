"""Real third-party models (pinned test extras): MONAI 3-D nets and efficientnet-pytorch.

For each: convert, train a few steps with the window pooling, check the pairing report against an
independent record of which norms directly follow a convolution, revert, and compare eval outputs
with BatchNorm's under the same parameters and statistics.
"""

import copy

import pytest
import torch
from efficientnet_pytorch import EfficientNet
from monai.networks.nets import SegResNet, UNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import cbn
from cbn.layers.cross_iteration_batchnorm import _CrossIterationBatchNorm

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

MODELS = {
    "monai_unet3d": (lambda: UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                                  num_res_units=1, norm="batch"), (2, 1, 16, 16, 16)),
    "monai_segresnet3d": (lambda: SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=4,
                                            blocks_down=(1, 1), blocks_up=(1,), norm="batch"), (2, 1, 16, 16, 16)),
    "efficientnet_b0": (lambda: EfficientNet.from_name("efficientnet-b0", image_size=64, num_classes=5),
                        (2, 3, 64, 64)),
}


def norms_fed_by_a_convolution(model: nn.Module, x: torch.Tensor) -> tuple[set[str], int]:
    """Names of the BatchNorm layers whose input is the very output of a convolution, unmodified
    since (a residual ``x += identity`` on a convolution's output changes its statistics), from
    hooks of its own."""
    outputs, fed, hooks = {}, set(), []

    def is_unmodified_output(tensor):
        found = outputs.get(id(tensor))
        return found is not None and found[0] is tensor and tensor._version == found[1]

    for name, module in model.named_modules():
        if isinstance(module, _CONVOLUTIONS):
            hooks.append(module.register_forward_hook(
                lambda m, a, out: outputs.__setitem__(id(out), (out, out._version))))
        if isinstance(module, _BatchNorm):
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, name=name: fed.add(name) if is_unmodified_output(a[0]) else None))
    model.train()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return fed, sum(isinstance(m, _BatchNorm) for m in model.modules())


def _output(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_train_report_revert(name):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    reference = make()
    x = torch.randn(shape)
    fed, norm_count = norms_fed_by_a_convolution(copy.deepcopy(reference), x)
    assert fed  # the check below is not vacuous

    model = cbn.convert_model(copy.deepcopy(reference), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(4):
        _output(model, torch.randn(shape)).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    rows = cbn.pairing_report(model)
    assert len(rows) == norm_count
    assert {r.layer for r in rows if r.compensated} == fed
    for row in rows:
        if not row.compensated:
            assert row.reason.startswith("input is the result of "), row
    layers = [m for m in model.modules() if isinstance(m, _CrossIterationBatchNorm)]
    assert all(int((layer.window_state.positions[0].stats[:, 4, 0] > 0).sum()) == 2 for layer in layers)  # window pooling
    assert all(bool(torch.isfinite(layer.running_var).all()) for layer in layers)

    model.eval()
    with torch.no_grad():
        cbn_eval = _output(model, x)
        reverted = cbn.revert_model(model)
        assert not any(isinstance(m, cbn.CrossIterationBatchNorm2d) for m in reverted.modules())
        reference.load_state_dict(reverted.state_dict())
        reference.eval()
        torch.testing.assert_close(_output(reverted, x), cbn_eval, rtol=0, atol=0)
        torch.testing.assert_close(_output(reference, x), cbn_eval, rtol=0, atol=0)
