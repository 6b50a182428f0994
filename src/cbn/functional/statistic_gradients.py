"""Closed-form gradients of a channel's batch statistics with respect to its producer's weights.

Write the producing layer as ``y[i, c] = W[c] . u[i] + b[c]``, with ``u[i]`` the input patch (the
im2col column) of output position ``i`` for a convolution, or the input row for a linear layer.
Over the ``m`` positions of a batch, with ``mu[c] = mean_i y[i, c]`` and
``var[c] = mean_i (y[i, c] - mu[c])^2``::

    d mu[c]  / d W[c] = mean_i u[i]                            the mean input patch
    d var[c] / d W[c] = (2/m) sum_i (y[i, c] - mu[c]) u[i]     a weight gradient for dy = 2 (y - mu) / m
    d mu[c]  / d b[c] = 1,      d var[c] / d b[c] = 0

Row ``c`` of ``W`` is the only one channel ``c`` depends on, so these rows are the whole Jacobian.
The mean patch does not depend on ``c`` within a group of a grouped convolution: it is stored once
per group. Both come from ``aten.convolution_backward`` asking for the weight gradient only, so no
``autograd.grad`` call and no retained graph is involved.

The variance form is the second-moment form of the paper re-centred: with ``nu = var + mu^2``,
``d nu / d W = d var / d W + 2 mu d mu / d W`` and ``d nu / d b = 2 mu``, and a Taylor step of
``(mu, nu)`` is the same as a step of ``(mu, var)`` minus ``(delta mu)^2`` (see ``window.py``).
Centring keeps float32 accurate when ``|mu| >> std``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRODUCER_TYPES = (*_CONVOLUTIONS, nn.Linear)
# From this batch size on, a separate batch-summed convolution for the mean patch is cheaper than
# an extra output channel in the variance's weight-gradient convolution (measured on CPU).
_SPLIT_BATCH = 8


class StatisticGradients(NamedTuple):
    """Gradients of ``k`` entries, in the window's layout.

    ``mean``: ``(groups, k, fan_in)``, one mean patch per group. ``var``: ``(C, k, fan_in)``.
    """

    mean: Tensor
    var: Tensor


def producer_groups(producer: nn.Module) -> int:
    """Number of weight groups whose output channels share one mean patch."""
    return producer.groups if isinstance(producer, _CONVOLUTIONS) else 1


def _padded_input(producer: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> tuple[Tensor, list[int]]:
    """The input padded the way the convolution pads it, and the padding left to pass on."""
    spatial_dims = x.dim() - 2
    if producer.padding_mode == "zeros" and not isinstance(producer.padding, str):
        return x, list(producer.padding)
    if producer.padding_mode == "zeros" and producer.padding == "valid":
        return x, [0] * spatial_dims
    # Non-zero padding modes and padding="same" (possibly asymmetric) pad explicitly, as nn.Conv does.
    mode = "constant" if producer.padding_mode == "zeros" else producer.padding_mode
    return F.pad(x, producer._reversed_padding_repeated_twice, mode=mode), [0] * spatial_dims


def _convolution_weight_gradient(
    producer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    grad_output: Tensor,
    x: Tensor,
    weight_shape: list[int],
    padding: list[int],
    groups: int,
) -> Tensor:
    spatial_dims = x.dim() - 2
    # Only the weight's shape is read: an expanded scalar avoids allocating it.
    weight = x.new_zeros(()).expand(weight_shape)
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        grad_output,
        x,
        weight,
        None,
        list(producer.stride),
        padding,
        list(producer.dilation),
        False,
        [0] * spatial_dims,
        groups,
        [False, True, False],
    )
    return weight_grad


def producer_statistic_gradients(
    producer: nn.Module, producer_input: Tensor, output: Tensor, mean: Tensor
) -> StatisticGradients:
    """Gradients of the per-channel mean and variance of ``output`` w.r.t. the producer's weight rows.

    Args:
        producer: the ``nn.Conv1d/2d/3d`` or ``nn.Linear`` that computed ``output``.
        producer_input: its input, in the statistics dtype (float32 or wider).
        output: its output ``(N, C, *)`` (``(N, C)`` for a linear layer), same dtype.
        mean: per-channel mean of ``output``, shape ``(C,)``.

    Returns:
        :class:`StatisticGradients` of one entry: ``mean`` of shape ``(groups, 1, fan_in)`` and
        ``var`` of shape ``(C, 1, fan_in)``, where ``fan_in = weight.numel() / C``.

    Example::

        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> y = conv(x).detach()
        >>> grads = producer_statistic_gradients(conv, x, y, y.mean((0, 2, 3)))
        >>> grads.mean.shape, grads.var.shape
        (torch.Size([1, 1, 27]), torch.Size([8, 1, 27]))
    """
    channels = output.shape[1]
    samples = output.numel() // channels
    channel_mean = mean.view(1, channels, *([1] * (output.dim() - 2)))
    if isinstance(producer, nn.Linear):
        centred = output - channel_mean
        mean_grad = producer_input.mean(0, keepdim=True)
        var_grad = centred.t().mm(producer_input).mul_(2.0 / samples)
        return StatisticGradients(mean_grad.unsqueeze(0), var_grad.unsqueeze(1))

    groups = producer.groups
    kernel_shape = list(producer.weight.shape[1:])
    padded, padding = _padded_input(producer, producer_input)
    if groups == 1 and output.shape[0] < _SPLIT_BATCH:
        # One weight-gradient convolution gives both: an extra output channel whose gradient is the
        # uniform 1/m yields the mean patch next to the C variance rows.
        grad_output = output.new_empty((output.shape[0], channels + 1, *output.shape[2:]))
        torch.sub(output, channel_mean, out=grad_output[:, :channels]).mul_(2.0 / samples)
        grad_output[:, channels:].fill_(1.0 / samples)
        both = _convolution_weight_gradient(
            producer, grad_output, padded, [channels + 1, *kernel_shape], padding, 1
        ).reshape(channels + 1, 1, -1)
        return StatisticGradients(both[channels:], both[:channels])
    centred = (output - channel_mean).mul_(2.0 / samples)
    var_grad = _convolution_weight_gradient(producer, centred, padded, [channels, *kernel_shape], padding, groups)
    # Padding is applied per sample with the same index map, so it commutes with the batch sum.
    batch_sum = padded.sum(0, keepdim=True)
    uniform = output.new_full((1, groups, *output.shape[2:]), 1.0 / samples)
    mean_grad = _convolution_weight_gradient(
        producer, uniform, batch_sum, [groups, *kernel_shape], padding, groups
    )
    return StatisticGradients(mean_grad.reshape(groups, 1, -1), var_grad.reshape(channels, 1, -1))


def statistic_shifts(
    gradients: StatisticGradients, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """First-order terms ``(d mu/dW . W + b, d var/dW . W)`` per channel, for ``k`` entries at once.

    Args:
        gradients: ``mean`` of shape ``(groups, k, fan_in)`` and ``var`` of shape ``(C, k, fan_in)``
            (the window's layout: one batched product per statistic).
        weight, bias: the producer's parameters.

    Returns:
        Two ``(k, C)`` tensors. The Taylor step from weights ``W_old`` to ``W_new`` is
        ``shift(W_new) - shift(W_old)``, which is why no weight snapshot is kept. Call it under
        ``torch.no_grad()``: the terms are constants of the step.
    """
    channels = weight.shape[0]
    groups = gradients.mean.shape[0]
    rows = weight.reshape(channels, -1)
    if rows.dtype != gradients.var.dtype:
        rows = rows.to(gradients.var.dtype)
    # Element-wise products and sums: batched small matmuls are several times slower on CPU.
    if groups == 1:
        mean_shift = torch.mm(gradients.mean[0], rows.t())
    else:
        grouped_rows = rows.view(groups, 1, channels // groups, -1)
        mean_shift = (gradients.mean.unsqueeze(2) * grouped_rows).sum(-1).transpose(0, 1).flatten(1)
    var_shift = (gradients.var * rows.unsqueeze(1)).sum(-1).t()
    if bias is not None:
        mean_shift = mean_shift + bias
    return mean_shift, var_shift
