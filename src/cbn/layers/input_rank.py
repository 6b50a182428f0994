"""Input-rank checks shared by the 1d/2d/3d variants of every norm layer in the package."""

from __future__ import annotations

from torch import Tensor


def check_input_rank(input: Tensor, ranks: tuple[int, ...], shapes: str) -> None:
    """Raise ``ValueError`` naming the expected shapes unless ``input.dim()`` is in ``ranks``."""
    if input.dim() not in ranks:
        raise ValueError(f"expected {shapes} input, got {input.dim()}D input")


class Input1d:
    """Mixin: ``(N, C)`` or ``(N, C, L)`` inputs, as ``nn.BatchNorm1d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, (2, 3), "2D (N, C) or 3D (N, C, L)")


class Input2d:
    """Mixin: ``(N, C, H, W)`` inputs, as ``nn.BatchNorm2d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, (4,), "4D (N, C, H, W)")


class Input3d:
    """Mixin: ``(N, C, D, H, W)`` inputs, as ``nn.BatchNorm3d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        check_input_rank(input, (5,), "5D (N, C, D, H, W)")
