"""A norm called several times in one model forward (a head shared over feature-pyramid levels).

Inside a converted model's forward each call position keeps its own window, so each level pools
its own statistics across iterations, exact against the dense-Jacobian oracle run per level; the
running statistics are updated at every call, as BatchNorm's are.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cbn
from oracle import DenseJacobianCBN

LEVEL_SIZES = (8, 5, 3)


class _SharedHead(nn.Module):
    """One convolution and one norm applied to every level, as in RetinaNet's and FCOS's heads."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = norm

    def forward(self, levels):
        return [self.norm(self.conv(x)) for x in levels]


def _levels(generator, dtype=torch.float64):
    return [torch.randn(2, 3, size, size, generator=generator, dtype=dtype) * 2 + 0.5 for size in LEVEL_SIZES]


def _step(model, levels, optimizer):
    outputs = model(levels)
    sum((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() for out in outputs).backward()
    optimizer.step()
    optimizer.zero_grad()
    return [out.detach() for out in outputs]


@pytest.mark.parametrize("compensate", [True, False])
def test_each_level_pools_its_own_window_exactly(compensate):
    model = cbn.convert_model(_SharedHead(nn.BatchNorm2d(4)).double(), window=3, compensate=compensate)
    oracles = [DenseJacobianCBN(model.conv, window=3, compensate=compensate) for _ in LEVEL_SIZES]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        levels = _levels(generator)
        gamma, beta = model.norm.weight.detach().clone(), model.norm.bias.detach().clone()
        with torch.no_grad():
            expected = [oracle(x, gamma, beta)[0] for oracle, x in zip(oracles, levels)]
        outputs = _step(model, levels, optimizer)
        for out, reference in zip(outputs, expected):
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-9)
    (row,) = cbn.pairing_report(model)
    assert row.compensated == compensate


def test_running_statistics_are_updated_at_every_call_as_batchnorm_does():
    reference = _SharedHead(nn.BatchNorm2d(4)).double()
    model = cbn.convert_model(copy.deepcopy(reference), window=1)
    generator = torch.Generator().manual_seed(4)
    for module in (reference, model):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        generator.manual_seed(4)
        for _ in range(3):
            _step(module, _levels(generator), optimizer)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model.norm, name), getattr(reference.norm, name), rtol=0, atol=1e-12)


def test_a_call_count_that_grows_after_the_first_iteration_opens_a_new_position():
    # A level that appears later (the earlier design refused it) gets a window of its own; the
    # two first positions keep theirs, and fewer calls than positions are fine (a level absent).
    model = cbn.convert_model(_SharedHead(nn.BatchNorm2d(4)).double(), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        _step(model, _levels(generator)[:2], optimizer)
    assert len(model.norm.window_state.positions) == 2
    _step(model, _levels(generator), optimizer)
    positions = model.norm.window_state.positions
    assert len(positions) == 3 and int((positions[2].stats[:, 4, 0] > 0).sum()) == 1
    assert all(int((p.stats[:, 4, 0] > 0).sum()) == 2 for p in positions[:2])
    _step(model, _levels(generator)[:1], optimizer)


def test_per_level_windows_resume_from_a_state_dict():
    model = cbn.convert_model(_SharedHead(nn.BatchNorm2d(4)).double(), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(6)
    for _ in range(3):
        _step(model, _levels(generator), optimizer)
    resumed = cbn.convert_model(_SharedHead(nn.BatchNorm2d(4)).double(), window=3)
    resumed.load_state_dict(model.state_dict())
    cbn.load_window_state_dict(resumed, cbn.window_state_dict(model))
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(2):
        levels = _levels(generator)
        for a, b in zip(_step(model, levels, optimizer), _step(resumed, levels, resumed_optimizer)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_torchvision_retinanet_head_with_batchnorm_trains_per_level():
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead

    head = RetinaNetClassificationHead(8, num_anchors=2, num_classes=3, norm_layer=nn.BatchNorm2d)

    class Head(nn.Module):  # the head's own forward loops over the levels
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, features):
            return self.head(features)

    model = cbn.convert_model(Head(), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        features = [torch.randn(2, 8, size, size) for size in (8, 4, 2)]
        model(features).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    norms = [m for m in model.modules() if isinstance(m, cbn.CrossIterationBatchNormBase)]
    assert norms and all(len(norm.window_state.positions) == 3 for norm in norms)  # one window per level
    assert all(row.compensated for row in cbn.pairing_report(model))
