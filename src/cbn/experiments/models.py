"""Small ResNets for 1x28x28 images, built with a norm factory so every norm kind plugs in.

The CIFAR-style ResNet of He et al. (2016): a 3x3 stem, three stages of basic blocks with
16, 32 and 64 channels (times ``width``), stride 2 between stages, 1x1-conv + norm shortcuts
where the shape changes, global average pooling and a linear classifier.
ResNet-20 has three blocks per stage, ResNet-8 one.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet with ``6 * blocks_per_stage + 2`` layers.

    Args:
        blocks_per_stage: basic blocks in each of the three stages (3 gives ResNet-20).
        norm: callable ``norm(num_channels) -> nn.Module``; defaults to ``nn.BatchNorm2d``.
        num_classes: outputs of the classifier.
        in_channels: channels of the input image.
        width: multiplier of the stage widths 16, 32, 64.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`
        - Output: :math:`(N, \\text{num\\_classes})`

    Example::

        >>> model = ResNet(3, norm=lambda c: nn.GroupNorm(8, c))
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        blocks_per_stage: int,
        norm: NormFactory | None = None,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 1,
    ) -> None:
        super().__init__()
        norm = norm or nn.BatchNorm2d
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        channels = widths[0]
        for index, stage_width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, stride, norm))
                channels = stage_width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(norm: NormFactory | None = None, **kwargs) -> ResNet:
    """ResNet-20 (three blocks per stage, 19 norm layers plus 2 shortcut norms)."""
    return ResNet(3, norm, **kwargs)


def resnet8(norm: NormFactory | None = None, **kwargs) -> ResNet:
    """ResNet-8 (one block per stage): the quick model of the demo and the tests."""
    return ResNet(1, norm, **kwargs)
