"""Moving Average Batch Normalization (MABN), a baseline of the fine-tuning study.

Implemented here from the equations of Yan et al., "Towards Stabilizing Batch Statistics in
Backward Propagation of Batch Normalization" (ICLR 2020); no code of the authors' release is used.

BatchNorm's training step has two forward statistics (the batch mean and variance) and two
backward statistics, per channel over the ``m`` values of a batch (``g_i = dL/dy_hat_i``)::

    g_B   = (1/m) sum_i g_i
    Psi_B = (1/m) sum_i g_i * y_hat_i
    dL/dx_i = (g_i - g_B - y_hat_i * Psi_B) / sigma_B

MABN makes all of them less noisy at small batch:

1. **No mean.** The convolution before the norm is weight-centralized (each output channel's
   weights have zero mean, :class:`CentralizedConv2d`), and the norm divides by the root of the
   second moment ``chi = E[x^2]`` instead of subtracting the mean and dividing by the standard
   deviation: ``y_hat = x / sqrt(chi + eps)``. Without the mean, ``g_B`` drops out of the backward
   (the exact gradient of ``x / sqrt(chi_B + eps)`` is ``(g_i - y_hat_i * Psi_B) / sqrt(chi_B + eps)``).
2. **Moving averages** of the remaining forward and backward statistics. After ``warmup`` training
   steps (before it, the current batch's ``chi_B`` and ``Psi_B``, i.e. the exact gradient)::

       chi_bar_t = mean(chi_B over the last `window` steps, this one included)   (forward)
       y_hat_i   = x_i / sqrt(chi_bar_t + eps)
       Psi_bar_t = mean(Psi_B over the last `window` steps, this one included)   (backward)
       dL/dx_i   = (g_i - y_hat_i * Psi_bar_t) / sqrt(chi_bar_t + eps)

   The past statistics are constants (no gradient flows into earlier steps).
3. Inference divides by the root of an exponential moving average of ``chi_B``
   (``momentum`` as BatchNorm's), then the affine ``gamma * y_hat + beta``.

Our choices where the paper leaves one: the paper averages ``chi`` with a simple moving average
and gives the backward statistic its own moving average; here both use the same window, which the
study sets exactly as CBN's (``min(16, 16 / batch)``), and the same warm-up as CBN's burn-in, so
MABN gets no hyperparameter that the other methods do not have.

Example::

    >>> norm = MABN2d(8, window=4, warmup=10)
    >>> y = norm(CentralizedConv2d(3, 8, 3, padding=1)(torch.randn(2, 3, 16, 16)))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CentralizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is centralized in every forward: ``W_hat = W - mean(W)``, the mean
    over each output channel's ``in_channels * kh * kw`` weights. Same parameters (and state-dict
    keys) as ``nn.Conv2d``; gradients flow through the centralization."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class _Window:
    """The last ``size`` per-channel statistics (detached), oldest dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[Tensor] = []

    def average_with(self, current: Tensor) -> Tensor:
        """Mean of the stored values and ``current`` (``size`` values at most in all)."""
        past = self.values[-(self.size - 1):] if self.size > 1 else []
        return torch.stack([*past, current]).mean(0)

    def push(self, value: Tensor) -> None:
        self.values.append(value.detach())
        if len(self.values) > self.size:
            del self.values[0]


class _MovingAverageNorm(torch.autograd.Function):
    """``y_hat = x / sqrt(chi + eps)`` with MABN's backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "MABN2d", averaged: bool) -> Tensor:
        dims = (0, 2, 3)
        chi_batch = x.pow(2).mean(dim=dims)
        chi = layer._chi.average_with(chi_batch) if averaged else chi_batch
        layer._chi.push(chi_batch)
        with torch.no_grad():
            layer.running_chi.mul_(1 - layer.momentum).add_(layer.momentum * chi_batch.to(layer.running_chi.dtype))
        inv = torch.rsqrt(chi + layer.eps)
        y_hat = x * inv.view(1, -1, 1, 1)
        ctx.save_for_backward(y_hat, inv)
        ctx.layer, ctx.averaged = layer, averaged
        return y_hat

    @staticmethod
    def backward(ctx, grad: Tensor):
        y_hat, inv = ctx.saved_tensors
        layer = ctx.layer
        psi_batch = (grad * y_hat).mean(dim=(0, 2, 3))
        psi = layer._psi.average_with(psi_batch) if ctx.averaged else psi_batch
        layer._psi.push(psi_batch)
        grad_x = (grad - y_hat * psi.view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)
        return grad_x, None, None


class MABN2d(nn.Module):
    """Moving Average Batch Normalization for ``(N, C, H, W)`` inputs (after a centralized conv).

    Args:
        num_features: channels ``C``.
        window: training steps in the moving averages of ``chi`` and ``Psi`` (this step included).
        warmup: training steps that use the current batch's statistics only (the buffers fill).
        eps: added to the second moment.
        momentum: of the inference second moment's exponential moving average.
        affine: learnable ``gamma`` (``weight``, ones) and ``beta`` (``bias``, zeros).
    """

    def __init__(self, num_features: int, window: int = 16, warmup: int = 0, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_features, self.window, self.warmup = num_features, window, warmup
        self.eps, self.momentum = eps, momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_chi", torch.ones(num_features))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._chi = _Window(window)
        self._psi = _Window(window)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input, got {x.dim()}-D")
        if self.training:
            averaged = int(self.steps) >= self.warmup and self.window > 1
            y_hat = _MovingAverageNorm.apply(x, self, averaged)
            self.steps += 1
        else:
            y_hat = x * torch.rsqrt(self.running_chi + self.eps).view(1, -1, 1, 1)
        if self.weight is not None:
            y_hat = y_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y_hat

    def extra_repr(self) -> str:
        return f"{self.num_features}, window={self.window}, warmup={self.warmup}, eps={self.eps}, momentum={self.momentum}"


def centralize_convolutions(model: nn.Module) -> nn.Module:
    """Make every ``nn.Conv2d`` of ``model`` that feeds a :class:`MABN2d` a :class:`CentralizedConv2d`
    (in place, same parameters), for models built as ``Sequential(conv, norm, ...)`` blocks."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for i in range(len(children) - 1):
            conv, norm = children[i], children[i + 1]
            if type(conv) is nn.Conv2d and isinstance(norm, MABN2d):
                conv.__class__ = CentralizedConv2d
    return model


__all__ = ["MABN2d", "CentralizedConv2d", "centralize_convolutions"]
