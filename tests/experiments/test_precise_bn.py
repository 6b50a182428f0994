"""Precise-BN control: recomputed statistics equal a direct layer-by-layer computation."""

import torch
import torch.nn.functional as F
from torch import nn

from cbn.experiments.precise_bn import recompute_population_statistics, running_stat_layers


class Reordered(nn.Module):
    """Registration order (bn2 before bn1) differs from execution order."""

    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(5)
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _direct(model, images):
    """Population statistics by hand, in float64: each layer sees the previous one normalized."""
    x = images.double()
    y1 = F.conv2d(x, model.conv1.weight.double(), model.conv1.bias.double())
    mean1, var1 = y1.mean((0, 2, 3)), y1.var((0, 2, 3), unbiased=True)
    h = (y1 - mean1[:, None, None]) / torch.sqrt(var1[:, None, None] + model.bn1.eps)
    h = torch.relu(h * model.bn1.weight.double()[:, None, None] + model.bn1.bias.double()[:, None, None])
    y2 = F.conv2d(h, model.conv2.weight.double(), model.conv2.bias.double(), padding=1)
    return (mean1, var1), (y2.mean((0, 2, 3)), y2.var((0, 2, 3), unbiased=True))


def test_recomputed_statistics_match_direct_computation():
    torch.manual_seed(0)
    model = Reordered()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 2.0)
        model.bn1.bias.uniform_(-1, 1)
    model.train()
    images = torch.randn(23, 3, 8, 8) * 2 + 0.5
    assert running_stat_layers(model, images[:1]) == [model.bn1, model.bn2]
    assert recompute_population_statistics(model, images, batch_size=7) == 2
    assert model.training  # mode restored
    (mean1, var1), (mean2, var2) = _direct(model, images)
    for layer, mean, var in ((model.bn1, mean1, var1), (model.bn2, mean2, var2)):
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-5)
