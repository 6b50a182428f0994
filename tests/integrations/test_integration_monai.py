"""MONAI: norm=("cbn", {...}) in UNet, SegResNet and DynUNet gives what convert_model gives from "batch"."""

import pytest
import torch
from monai.networks.layers import Norm
from monai.networks.nets import DynUNet, SegResNet, UNet
from torch.nn.modules.batchnorm import _BatchNorm

import cbn
import cbn.integrations.monai  # noqa: F401  (registers)

NETWORKS = {
    "unet3d": (lambda norm: UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                                 num_res_units=1, norm=norm), (2, 1, 16, 16, 16)),
    "segresnet2d": (lambda norm: SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=4,
                                           blocks_down=(1, 1), blocks_up=(1,), norm=norm), (2, 1, 16, 16)),
    "dynunet2d": (lambda norm: DynUNet(spatial_dims=2, in_channels=1, out_channels=2, kernel_size=(3, 3, 3),
                                       strides=(1, 2, 2), upsample_kernel_size=(2, 2), norm_name=norm),
                  (2, 1, 16, 16)),
}


def _train(model, x, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        out = model(x)
        loss = (out if isinstance(out, torch.Tensor) else out[0]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss


@pytest.mark.parametrize("name", list(NETWORKS))
def test_cbn_by_name_equals_converting_the_batchnorm_network(name):
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    by_name = build(("cbn", {"window": 3, "burnin": 1}))
    torch.manual_seed(0)
    converted = cbn.convert_model(build("batch"), window=3, burnin=1)
    kinds = [type(m) for m in by_name.modules() if isinstance(m, _BatchNorm)]
    assert kinds and kinds == [type(m) for m in converted.modules() if isinstance(m, _BatchNorm)]
    assert all(k.__name__ == f"CrossIterationBatchNorm{shape.__len__() - 2}d" for k in kinds)
    assert all(m.window == 3 and m.burnin == 1 for m in by_name.modules() if isinstance(m, _BatchNorm))
    by_name = cbn.convert_model(by_name)  # keeps the layers, pairs them at the first training forward
    by_name.load_state_dict(converted.state_dict())
    x = torch.randn(shape)
    # Same layers, same parameters, same pairing: the same training, bit for bit.
    assert torch.equal(_train(by_name, x), _train(converted, x))
    report = cbn.pairing_report(by_name)
    assert report == cbn.pairing_report(converted)
    assert sum(row.compensated for row in report) > 0, cbn.format_pairing_report(report)
    for a, b in zip(by_name.state_dict().values(), converted.state_dict().values()):
        assert torch.equal(a, b)


def test_factory_refuses_an_unknown_dimension_and_registers_once():
    import importlib

    importlib.reload(cbn.integrations.monai)
    assert list(Norm.names).count("CBN") == 1
    with pytest.raises(ValueError, match="1, 2 or 3"):
        Norm["cbn", 4]
