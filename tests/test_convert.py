import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import cbn
from zoo import produced_by
from cbn.experiments.models import resnet20


def _train(model, steps=3, shape=(2, 1, 28, 28)):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(torch.randn(shape)), torch.randint(0, 10, shape[:1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_converter_pairs_every_norm_of_a_resnet_with_shortcuts():
    model = resnet20()
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    model = cbn.convert_model(model, window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, cbn.CrossIterationBatchNorm2d)}
    assert len(norms) == 21 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for name, norm in norms.items():
        # bn1 <- conv1, bn2 <- conv2, downsample.1 <- downsample.0
        expected = name.replace("bn", "conv") if "bn" in name else name[:-1] + "0"
        assert produced_by(norm, convs[expected]), name
        assert norm.window_state.positions[0].var_grad.abs().sum() > 0


def test_converter_pairs_a_transposed_convolution_without_warning():
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.BatchNorm2d(6)
    )
    model = cbn.convert_model(model, window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            model(torch.randn(2, 4, 5, 5)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    layer = model[1]
    assert isinstance(layer, cbn.CrossIterationBatchNorm2d) and produced_by(layer, model[0])
    # One row per output channel: C_in / groups x kernel = 2 x 3 x 3 weights.
    assert layer.window_state.positions[0].mean_grad.shape == (2, 2, 18) and layer.window_state.positions[0].var_grad.shape == (6, 2, 18)
    assert layer.window_state.positions[0].var_grad.abs().sum() > 0


def test_converter_shares_parameters_and_buffers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    weight, running_mean = model[1].weight, model[1].running_mean
    model = cbn.convert_model(model)
    assert model[1].weight is weight and model[1].running_mean is running_mean


def test_unpaired_norm_warns_once_naming_the_layers():
    class PreActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm_after_relu = nn.BatchNorm2d(4)
            self.paired = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.paired(self.norm_after_relu(torch.relu(self.conv(x))))

    model = cbn.convert_model(PreActivation())
    with pytest.warns(UserWarning, match="norm_after_relu") as record:
        model(torch.randn(2, 1, 6, 6))
    assert len([w for w in record if "cbn" in str(w.message)]) == 1
    assert "paired" not in str(record[0].message)
    assert produced_by(model.paired[1], model.paired[0]) and not model.norm_after_relu.pairing_status()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 1, 6, 6))


def test_revert_then_fuse_gives_the_same_eval_outputs():
    torch.manual_seed(4)
    model = cbn.convert_model(resnet20(), window=3)
    _train(model, steps=4)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    reverted = cbn.revert_model(model)
    assert not any(isinstance(m, cbn.CrossIterationBatchNorm2d) for m in reverted.modules())
    torch.testing.assert_close(reverted(x), expected, rtol=0, atol=0)
    reverted.conv1 = fuse_conv_bn_eval(reverted.conv1, reverted.bn1)
    reverted.bn1 = nn.Identity()
    torch.testing.assert_close(reverted(x), expected, rtol=1e-4, atol=1e-5)
    scripted = torch.jit.script(cbn.revert_model(copy.deepcopy(model)))
    torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-6)


def test_deepcopy_of_converted_model_pairs_with_its_own_convs():
    model = cbn.convert_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    model(torch.randn(2, 1, 5, 5))
    clone = copy.deepcopy(model)
    clone(torch.randn(2, 1, 5, 5))
    assert produced_by(clone[1], clone[0])


# ----------------------------------------------------------------------------- every BatchNorm kind
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm as timm_convert_sync_batchnorm
from timm.layers.split_batchnorm import SplitBatchNorm2d
from torchvision.ops import FrozenBatchNorm2d

from cbn.layers.norm_act import CrossIterationBatchNormAct, CrossIterationBatchNormAct2d


def _train_steps(model, shape, steps=3, seed=0):
    """SGD steps on seeded inputs; returns the training outputs."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outputs = []
    for _ in range(steps):
        out = model(torch.randn(shape, generator=generator, dtype=torch.float64))
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(out.detach())
    return outputs


def test_batchnormact2d_trains_as_converted_batchnorm_then_its_activation():
    # timm's norm + act module must train exactly as a converted nn.BatchNorm2d followed by the
    # same activation: same window, same Taylor step, then the activation.
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 6, 3).double()
    fused = nn.Sequential(copy.deepcopy(conv), BatchNormAct2d(6, act_layer=nn.SiLU).double())
    split = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(6).double(), nn.SiLU())
    fused_act = fused[1].act
    fused = cbn.convert_model(fused, window=3)
    split = cbn.convert_model(split, window=3)
    layer = fused[1]
    assert type(layer) is CrossIterationBatchNormAct2d and layer.act is fused_act and isinstance(layer.drop, nn.Identity)
    for a, b in zip(_train_steps(fused, (2, 3, 6, 6), steps=4), _train_steps(split, (2, 3, 6, 6), steps=4)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert produced_by(layer, fused[0]) and layer.pairing_status()[0]
    torch.testing.assert_close(layer.running_var, split[1].running_var, rtol=0, atol=0)


def test_batchnormact2d_applies_its_drop_module_after_the_norm_and_before_the_act():
    class Negate(nn.Module):
        def forward(self, x):
            return -x

    norm = BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=Negate)
    model = cbn.convert_model(nn.Sequential(nn.Conv2d(2, 4, 1), norm), window=2)
    x = torch.randn(3, 2, 5, 5)
    out = model(x)
    normalized = nn.functional.batch_norm(model[0](x), None, None, norm.weight, norm.bias, True)
    torch.testing.assert_close(out, torch.relu(-normalized), rtol=1e-5, atol=1e-6)
    assert isinstance(model[1].drop, Negate)


def test_revert_restores_batchnormact2d_with_its_modules_attributes_and_state():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.Hardswish, momentum=0.2))
    model[1].qconfig = "kept"  # any attribute of the original survives the round trip
    original = copy.deepcopy(model)
    act = model[1].act
    model = cbn.convert_model(model, window=3)
    _train_steps(model.double(), (2, 3, 7, 7))
    model[1].momentum = 0.05  # changed on the converted layer: carried back
    reverted = cbn.revert_model(model.float())
    norm = reverted[1]
    assert type(norm) is BatchNormAct2d and norm.act is act and norm.qconfig == "kept" and norm.momentum == 0.05
    assert norm.weight is model[1].weight and norm.running_mean is model[1].running_mean
    assert list(norm.state_dict()) == list(original[1].state_dict())
    original.load_state_dict(reverted.state_dict())
    reverted.eval(), original.eval()
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(reverted(x), original(x), rtol=0, atol=0)


def test_sync_batchnormact_converts_and_reverts_with_its_activation():
    model = timm_convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.GELU)))
    assert type(model[1]) is SyncBatchNormAct
    act = model[1].act
    model = cbn.convert_model(model, window=3)
    assert type(model[1]) is CrossIterationBatchNormAct and model[1].act is act
    _train_steps(model.double(), (2, 3, 6, 6))
    assert model[1].pairing_status()[0]
    reverted = cbn.revert_model(model)
    assert type(reverted[1]) is SyncBatchNormAct and reverted[1].act is act


def test_converted_model_deepcopies_pickles_and_loads_then_reverts_to_the_original_classes():
    import io

    model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    _train_steps(model.double(), (2, 3, 6, 6))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    fresh = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    fresh.double().load_state_dict(model.state_dict())
    expected = cbn.revert_model(copy.deepcopy(model)).state_dict()
    for clone in (*copies, fresh):
        reverted = cbn.revert_model(clone)
        assert [type(m) for m in reverted] == [nn.Conv2d, BatchNormAct2d, nn.Conv2d, nn.BatchNorm2d]
        assert list(reverted.state_dict()) == list(expected)
        for key, value in reverted.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_unknown_batchnorm_subclasses_are_left_and_named_in_one_warning():
    class MyNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(
        nn.Conv2d(4, 4, 1), SplitBatchNorm2d(4), nn.Conv2d(4, 4, 1), MyNorm(4),
        nn.Conv2d(4, 4, 1), MyNorm(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
    )
    kept = [model[1], model[3], model[5]]
    with pytest.warns(UserWarning) as record:
        model = cbn.convert_model(model)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and record[0].filename == __file__  # points at the user's call
    assert "timm.layers.split_batchnorm.SplitBatchNorm2d (1 layer: 1)" in messages[0]
    assert "MyNorm (2 layers: 3, 5)" in messages[0] and "test_convert" in messages[0]
    assert [model[1], model[3], model[5]] == kept and type(model[7]) is cbn.CrossIterationBatchNorm2d
    assert [row.layer for row in cbn.pairing_report(model)] == ["7"]


def test_baseline_converters_name_the_kinds_they_leave():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"cbn.convert_batchrenorm left .*BatchNormAct2d \(1 layer: 1\)"):
        model = cbn.convert_batchrenorm(model)
    assert type(model[2]) is cbn.BatchRenorm2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call keeps the BatchRenorm layers silently
        cbn.convert_batchrenorm(nn.Sequential(cbn.BatchRenorm2d(4)))
        cbn.convert_sync_batchnorm(nn.Sequential(cbn.SyncBatchNorm2d(4)))


def test_frozen_batchnorm_stays_frozen_and_silent():
    import torchvision

    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    frozen = {name: m for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = cbn.convert_model(model)
    assert {name: m for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)} == frozen
    assert cbn.pairing_report(model) == []
    model(torch.randn(2, 3, 32, 32))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_uninitialized_lazy_norm_is_refused_before_any_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LazyConv2d(5, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"3 \(LazyBatchNorm2d\) not initialized yet.*Run one forward"):
        cbn.convert_model(model)
    assert type(model[1]) is nn.BatchNorm2d and not model._forward_hooks and not model[0]._forward_hooks
    model(torch.randn(2, 3, 6, 6))  # what the error asks: one forward initializes the lazy layers
    model = cbn.convert_model(model, window=3)
    assert type(model[3]) is cbn.CrossIterationBatchNorm2d and model[3].num_features == 5
    _train_steps(model.double(), (2, 3, 6, 6))
    assert produced_by(model[3], model[2])
    assert type(cbn.revert_model(model)[3]) is nn.BatchNorm2d


def test_lazy_norm_initialized_by_a_state_dict_converts_and_reverts_to_what_it_becomes():
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    lazy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    lazy.load_state_dict(source.state_dict())
    assert type(lazy[1]) is nn.LazyBatchNorm2d and not lazy[1].has_uninitialized_params()
    model = cbn.convert_model(lazy)
    assert type(model[1]) is cbn.CrossIterationBatchNorm2d
    reverted = cbn.revert_model(model)
    assert type(reverted[1]) is nn.BatchNorm2d and not reverted[1]._forward_pre_hooks
    x = torch.randn(2, 3, 5, 5)
    source.eval(), reverted.eval()
    torch.testing.assert_close(reverted(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("convert", [cbn.convert_batchrenorm, cbn.convert_sync_batchnorm, cbn.convert_model])
def test_converters_keep_a_norm_without_bias(convert):
    # nn.BatchNorm2d(bias=False): a learnable scale, no shift. The baselines used to raise TypeError.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, bias=False))
    weight = model[1].weight
    model = convert(model)
    assert model[1].bias is None and model[1].weight is weight and "bias" not in dict(model[1].named_parameters())
    out = model(torch.randn(2, 3, 5, 5))
    assert out.shape == (2, 4, 3, 3)
    # Without a shift and with unit scale, each channel of a training output has mean zero.
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer_class", [cbn.BatchRenorm1d, cbn.BatchRenorm2d, cbn.SyncBatchNorm2d, cbn.SyncBatchNorm3d])
def test_baseline_constructors_take_bias_like_batchnorm(layer_class):
    layer = layer_class(5, bias=False)
    assert layer.bias is None and layer.weight.shape == (5,)
    assert set(layer.state_dict()) == set(nn.BatchNorm1d(5, bias=False).state_dict())


def test_a_batchnorm_root_converts_and_reverts():
    norm = nn.BatchNorm1d(3)
    layer = cbn.convert_model(norm)
    assert type(layer) is cbn.CrossIterationBatchNorm1d and layer.weight is norm.weight
    assert type(cbn.revert_model(layer)) is nn.BatchNorm1d
