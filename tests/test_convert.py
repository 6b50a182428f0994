import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import cbn
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
        assert norm.producer is convs[expected], name
        assert norm.window_var_grad.abs().sum() > 0


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
    assert isinstance(layer, cbn.CrossIterationBatchNorm2d) and layer.producer is model[0]
    # One row per output channel: C_in / groups x kernel = 2 x 3 x 3 weights.
    assert layer.window_mean_grad.shape == (2, 2, 18) and layer.window_var_grad.shape == (6, 2, 18)
    assert layer.window_var_grad.abs().sum() > 0


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
    assert model.paired[1].producer is model.paired[0] and model.norm_after_relu.producer is None
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
    assert clone[1].producer is clone[0]


def test_batched_window_summary_equals_per_layer_summary():
    # convert_model summarizes all windows at once before the forward (a pre-hook); without the
    # hook each layer summarizes its own window: both must give the same training run.
    torch.manual_seed(5)
    batched = cbn.convert_model(resnet20(), window=3)
    per_layer = copy.deepcopy(batched)
    per_layer._forward_pre_hooks.clear()
    for model in (batched, per_layer):
        torch.manual_seed(6)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        outputs = []
        for _ in range(5):
            out = model(torch.randn(2, 1, 28, 28))
            out.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
        model.outputs = outputs
    norms = [m for m in batched.modules() if isinstance(m, cbn.CrossIterationBatchNorm2d)]
    for hook in batched._forward_pre_hooks.values():
        hook(batched, ())
    assert all(norm._prepared_past is not None for norm in norms)  # the batched path was taken
    for a, b in zip(batched.outputs, per_layer.outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
