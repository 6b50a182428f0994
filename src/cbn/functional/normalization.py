"""The differentiable part of Cross-Iteration BatchNorm: pooling the current batch with the past.

Given the current batch statistics ``mu_t, var_t`` (with gradient) and the constants
``(c, P, n - 1)`` that summarize the ``n - 1`` past entries moved to the current weights
(``window.py``), the pooled statistics of ``cbn-math.md``,
``mu_bar = (1/n) sum mu_tau`` and ``var_bar = (1/n) sum nu_tau - mu_bar^2``, are::

    delta   = mu_t - c
    mu_bar  = c + delta / n
    var_bar = (var_t + P + (n - 1) / n * delta^2) / n

an exact rearrangement (the parallel-variance identity) that never subtracts two large raw
moments. Gradients flow through ``mu_t`` and ``var_t`` only; past entries are constants.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .window import PastStatistics


class PooledStatistics(NamedTuple):
    """Per-channel statistics of one training forward: ``(C,)`` tensors in the statistics dtype."""

    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor


def reduction_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def pooled_statistics(input: Tensor, past: PastStatistics, stats_dtype: torch.dtype) -> PooledStatistics:
    """Current batch moments of ``input`` (``(N, C, *)``) pooled with ``past``, differentiably."""
    batch_var, batch_mean = torch.var_mean(input.to(stats_dtype), reduction_dims(input), correction=0)
    entries = past.count + 1
    delta = batch_mean - past.center
    mean = past.center + delta / entries
    var = (batch_var + past.spread + past.count / entries * delta.square()) / entries
    return PooledStatistics(batch_mean, batch_var, mean, var)


def normalize(
    input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel, in ``input``'s dtype."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    out = (input - mean.to(input.dtype).view(shape)) * scale.to(input.dtype).view(shape)
    if bias is not None:
        out = out + bias.to(input.dtype).view(shape)
    return out


def cross_iteration_batch_norm(
    input: Tensor,
    past: PastStatistics,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    stats_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, PooledStatistics]:
    """Normalize ``input`` with its batch statistics pooled with ``past`` (a pure function).

    Args:
        input: ``(N, C, *)`` tensor.
        past: summary of the past entries (``window.pool_past``); ``count = 0`` gives BatchNorm.
        weight, bias: optional affine parameters ``(C,)``.
        eps: added to the pooled variance inside the square root.
        stats_dtype: dtype of the statistics (float32 or wider).

    Returns:
        The normalized tensor (``input``'s shape and dtype) and the statistics it used.
    """
    stats = pooled_statistics(input, past, stats_dtype)
    return normalize(input, stats.mean, stats.var, weight, bias, eps), stats
