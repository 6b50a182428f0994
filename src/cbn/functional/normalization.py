"""The differentiable part of Cross-Iteration BatchNorm: pooling the current batch with the past.

Given the current batch statistics ``mu_t, var_t`` (``m`` values per channel) and the constants
``(c, P, n - 1)`` that summarize the ``n - 1`` past entries moved to the current weights
(``window.py``), the pooled statistics of ``cbn-math.md``,
``mu_bar = (1/n) sum mu_tau`` and ``var_bar = (1/n) sum nu_tau - mu_bar^2``, are::

    delta   = mu_t - c
    mu_bar  = c + delta / n
    var_bar = (var_t + P + (n - 1) / n * delta^2) / n

an exact rearrangement (the parallel-variance identity) that never subtracts two large raw
moments. The output is ``y = (x - mu_bar) / sqrt(var_bar + eps) * gamma + beta``.

Gradients flow through ``mu_t`` and ``var_t`` only (past entries are constants). With
``g = dL/dy``, ``s = 1/sqrt(var_bar + eps)``, ``G = sum g`` and ``H = sum g * (x - mu_bar) * s``
over a channel::

    dL/dmu_bar  = -gamma s G                 dL/dvar_bar = -gamma s^2 H / 2
    dL/dmu_t    = dL/dmu_bar / n + dL/dvar_bar * 2 (n - 1) delta / n^2
    dL/dvar_t   = dL/dvar_bar / n
    dL/dx       = gamma s g + dL/dmu_t / m + 2 (x - mu_t) dL/dvar_t / m
    dL/dgamma   = H                          dL/dbeta = G

:class:`CrossIterationNorm` implements this backward by hand: one fused BatchNorm kernel gives
``gamma s g``, ``G`` and ``H``, and two element-wise passes add the statistics' terms, instead of
the dozens of small operations autograd would record. The backward is not itself
differentiable (no double backward, as with the statistics of SyncBatchNorm).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .window import PastStatistics


class PooledStatistics(NamedTuple):
    """Per-channel statistics of one training forward: ``(C,)`` tensors in the statistics dtype."""

    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor


def reduction_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def _pool(batch_mean: Tensor, batch_var: Tensor, past: PastStatistics) -> tuple[Tensor, Tensor, Tensor]:
    entries = past.count + 1
    delta = batch_mean - past.center
    mean = past.center + delta / entries
    var = (batch_var + past.spread + past.count / entries * delta.square()) / entries
    return mean, var, delta


class CrossIterationNorm(torch.autograd.Function):
    """Normalization with pooled statistics and the hand-written backward above."""

    @staticmethod
    def forward(ctx, input, weight, bias, center, spread, count, eps, stats_dtype):
        # BatchNorm's own statistics kernel: far faster on CPU than var_mean over (0, 2, ...).
        batch_mean, batch_var = torch.batch_norm_update_stats(
            input if input.dtype == stats_dtype else input.to(stats_dtype), None, None, 0.0
        )
        past = PastStatistics(center, spread, count)
        mean, var, delta = _pool(batch_mean, batch_var, past)
        # Eval-mode BatchNorm with the pooled statistics is exactly the normalization wanted.
        output = torch.native_batch_norm(input, weight, bias, mean, var, False, 0.0, eps)[0]
        ctx.save_for_backward(input, weight, batch_mean, mean, var, delta, count)
        ctx.eps = eps
        ctx.mark_non_differentiable(batch_mean, batch_var, mean, var)
        return output, batch_mean, batch_var, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, *unused):
        input, weight, batch_mean, mean, var, delta, count = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_direct, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_output.contiguous(memory_format=_memory_format(input)),
            input,
            weight,
            mean,
            var,
            None,
            None,
            False,
            ctx.eps,
            [needs_input, needs_weight or needs_input, needs_bias or needs_input],
        )
        grad_input = None
        if needs_input:
            entries = count + 1
            samples = input.numel() // input.shape[1]
            invstd = torch.rsqrt(var + ctx.eps)
            gamma_invstd = invstd if weight is None else invstd * weight
            grad_mean_bar = -gamma_invstd * sum_g
            grad_var_bar = -0.5 * gamma_invstd * invstd * sum_g_xhat
            grad_batch_mean = grad_mean_bar / entries + grad_var_bar * (2 * count / entries.square()) * delta
            grad_batch_var = grad_var_bar / entries
            shape = (1, -1) + (1,) * (input.dim() - 2)
            centred = input - batch_mean.to(input.dtype).view(shape)
            grad_input = grad_direct.add_((grad_batch_mean / samples).to(input.dtype).view(shape))
            grad_input.addcmul_(centred, (2 * grad_batch_var / samples).to(input.dtype).view(shape))
        return (
            grad_input,
            sum_g_xhat if needs_weight else None,
            sum_g if needs_bias else None,
            None, None, None, None, None,
        )


def _memory_format(input: Tensor) -> torch.memory_format:
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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

    Example::

        >>> past = PastStatistics(torch.zeros(3), torch.zeros(3), torch.tensor(0.0))
        >>> out, stats = cross_iteration_batch_norm(torch.randn(4, 3, 5), past, None, None, 1e-5)
    """
    output, *stats = CrossIterationNorm.apply(
        input, weight, bias, past.center, past.spread, past.count, eps, stats_dtype
    )
    return output, PooledStatistics(*stats)
