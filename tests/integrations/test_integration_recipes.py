"""The recipes of docs/integrations.md for accelerate (real package) and detectron2 (a stand-in of its layout)."""

import copy
import warnings

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F

import cbn


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 2, (8,), generator=generator)


def _train(model, optimizer, loader, backward):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()


def test_accelerate_recipe_trains_as_the_plain_loop():
    x, y = _data()
    reference = cbn.convert_model(_net(), window=3)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    _train(reference, optimizer, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2),
           lambda loss: loss.backward())

    model = cbn.convert_model(_net(), window=3)  # the recipe: convert, then prepare
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    _train(prepared, optimizer, loader, accelerator.backward)

    unwrapped = accelerator.unwrap_model(prepared)
    assert unwrapped[1].iterations == 4 and all(row.compensated for row in cbn.pairing_report(unwrapped))
    for (key, a), b in zip(reference.state_dict().items(), unwrapped.state_dict().values()):
        assert torch.equal(a, b), key


class Conv2d(nn.Conv2d):
    """Stand-in of detectron2's ``detectron2.layers.Conv2d``: ``norm`` and ``activation`` keywords,
    the norm a child of the convolution, applied in its ``forward`` after ``F.conv2d``."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """Stand-in of detectron2's "SyncBN": a BatchNorm2d subclass with its own forward."""


def _detectron2_block(norm):
    return nn.Sequential(Conv2d(3, 4, 3, bias=False, norm=norm(4), activation=F.relu),
                         Conv2d(4, 4, 3, bias=False, norm=norm(4)))


def test_detectron2_recipe_converts_bn_and_names_its_syncbn():
    model = cbn.convert_model(_detectron2_block(nn.BatchNorm2d), window=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        # (a sum of normalized outputs has no gradient: the weights would not move, no iteration)
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [type(m.norm) for m in model] == [cbn.CrossIterationBatchNorm2d] * 2
    assert all(m.norm.iterations == 3 and m.norm.window_state.positions[0].stats[0, 4].min() > 0 for m in model)
    # The code path: a callable as norm builds CBN directly.
    direct = _detectron2_block(lambda channels: cbn.CrossIterationBatchNorm2d(channels, window=2))
    assert [type(m.norm) for m in cbn.convert_model(direct)] == [cbn.CrossIterationBatchNorm2d] * 2
    with pytest.warns(UserWarning, match="NaiveSyncBatchNorm"):
        synced = cbn.convert_model(_detectron2_block(NaiveSyncBatchNorm))
    assert [type(m.norm) for m in synced] == [NaiveSyncBatchNorm] * 2


def test_detectron2_layout_is_compensated():
    model = cbn.convert_model(_detectron2_block(nn.BatchNorm2d), window=2)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    report = cbn.pairing_report(model)
    assert all(row.compensated for row in report), cbn.format_pairing_report(report)
