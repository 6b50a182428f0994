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

from .window import PastStatistics, pooling_weights


class PooledStatistics(NamedTuple):
    """Per-channel statistics of one training forward: ``(C,)`` tensors in the statistics dtype."""

    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor


def reduction_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def pool_with_past(batch_mean: Tensor, batch_var: Tensor, past: PastStatistics) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pooled ``(mean, var)`` of the module formula, and what its backward needs.

    Returns ``(mean, var, 1/n, d var_bar / d mu_t / 2)``; differentiable in ``batch_mean`` and
    ``batch_var`` when called under autograd (the cross-process path does). The pooling weights
    of ``past`` are used when it carries them (:func:`cbn.functional.window.pool_past`).
    """
    if past.inv_entries is None:
        past = past._replace(**dict(zip(("inv_entries", "spread_share", "delta_weight"),
                                        pooling_weights(past.count, past.spread))))
    delta = batch_mean - past.center
    mean = torch.addcmul(past.center, delta, past.inv_entries)
    var = torch.addcmul(torch.addcmul(past.spread_share, batch_var, past.inv_entries), delta.square(), past.delta_weight)
    return mean, var, past.inv_entries, delta * past.delta_weight


def normalize(
    input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel with plain autograd ops.

    Used where ``mean`` and ``var`` carry gradients from elsewhere (the cross-process path).
    """
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    out = (input - _as(mean, input).view(shape)) * _as(scale, input).view(shape)
    if bias is not None:
        out = out + _as(bias, input).view(shape)
    return out


class CrossIterationNorm(torch.autograd.Function):
    """Normalization with pooled statistics and the hand-written backward above.

    With ``past = None`` (window 1, burn-in) it is exactly BatchNorm's fused kernel, both ways.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, past, eps, stats_dtype):
        ctx.eps = eps
        ctx.pooled = past is not None
        if not ctx.pooled and input.dtype == stats_dtype:
            output, batch_mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
            batch_var = invstd.pow(-2).sub_(eps)
            ctx.save_for_backward(input, weight, batch_mean, invstd)
            ctx.mark_non_differentiable(batch_mean, batch_var)
            return output, batch_mean, batch_var, batch_mean, batch_var
        # BatchNorm's statistics kernel: far faster on CPU than var_mean over (0, 2, ...).
        batch_mean, batch_var = torch.batch_norm_update_stats(
            input if input.dtype == stats_dtype else input.to(stats_dtype), None, None, 0.0
        )
        if ctx.pooled:
            mean, var, inv_entries, half_slope = pool_with_past(batch_mean, batch_var, PastStatistics(*past))
        else:
            mean, var = batch_mean, batch_var
            inv_entries, half_slope = batch_mean.new_ones(()), torch.zeros_like(batch_mean)
        # Eval-mode BatchNorm with the pooled statistics is exactly the normalization wanted.
        output = torch.native_batch_norm(input, weight, bias, mean, var, False, 0.0, eps)[0]
        ctx.pooled = True
        ctx.save_for_backward(input, weight, batch_mean, var, inv_entries, half_slope, mean)
        ctx.mark_non_differentiable(batch_mean, batch_var, mean, var)
        return output, batch_mean, batch_var, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, *unused):
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        input = ctx.saved_tensors[0]
        grad_output = grad_output.contiguous(memory_format=_memory_format(input))
        if not ctx.pooled:
            input, weight, batch_mean, invstd = ctx.saved_tensors
            grads = torch.ops.aten.native_batch_norm_backward(
                grad_output, input, weight, None, None, batch_mean, invstd, True, ctx.eps,
                [needs_input, needs_weight, needs_bias],
            )
            return (*grads, None, None, None)
        input, weight, batch_mean, var, inv_entries, half_slope, mean = ctx.saved_tensors
        grad_direct, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_output, input, weight, mean, var, None, None, False, ctx.eps,
            [needs_input, needs_weight or needs_input, needs_bias or needs_input],
        )
        grad_input = None
        if needs_input:
            samples = input.numel() // input.shape[1]
            invstd = torch.rsqrt(var + ctx.eps)
            gamma_invstd = invstd if weight is None else invstd * weight
            minus_grad_mean_bar = gamma_invstd * sum_g
            minus_twice_grad_var_bar = gamma_invstd * invstd * sum_g_xhat
            # -m dL/dmu_t and -m/2 dL/dvar_t, per channel
            mean_coefficient = torch.addcmul(minus_grad_mean_bar * inv_entries, minus_twice_grad_var_bar, half_slope)
            var_coefficient = minus_twice_grad_var_bar * inv_entries
            shape = (1, -1) + (1,) * (input.dim() - 2)
            centred = input - _as(batch_mean, input).view(shape)
            grad_input = grad_direct.sub_(_as(mean_coefficient, input).view(shape), alpha=1.0 / samples)
            grad_input.addcmul_(centred, _as(var_coefficient, input).view(shape), value=-1.0 / samples)
        return (
            grad_input,
            sum_g_xhat if needs_weight else None,
            sum_g if needs_bias else None,
            None, None, None,
        )


def _as(tensor: Tensor, like: Tensor) -> Tensor:
    return tensor if tensor.dtype == like.dtype else tensor.to(like.dtype)


def _memory_format(input: Tensor) -> torch.memory_format:
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def cross_iteration_batch_norm(
    input: Tensor,
    past: PastStatistics | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    stats_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, PooledStatistics]:
    """Normalize ``input`` with its batch statistics pooled with ``past`` (a pure function).

    Args:
        input: ``(N, C, *)`` tensor.
        past: summary of the past entries (``window.pool_past``); ``None`` (or ``count = 0``)
            gives BatchNorm.
        weight, bias: optional affine parameters ``(C,)``.
        eps: added to the pooled variance inside the square root.
        stats_dtype: dtype of the statistics (float32 or wider).

    Returns:
        The normalized tensor (``input``'s shape and dtype) and the statistics it used.

    Example::

        >>> past = PastStatistics(torch.zeros(3), torch.zeros(3), torch.tensor(0.0))
        >>> out, stats = cross_iteration_batch_norm(torch.randn(4, 3, 5), past, None, None, 1e-5)
    """
    output, *stats = CrossIterationNorm.apply(input, weight, bias, past, eps, stats_dtype)
    return output, PooledStatistics(*stats)


def pooled_normalization(
    input: Tensor, batch_mean: Tensor, batch_var: Tensor, past: PastStatistics | None,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> tuple[Tensor, PooledStatistics]:
    """Pool differentiable batch statistics with ``past`` and normalize, with plain autograd ops.

    For statistics that come with gradients of their own (pooled across processes) and for
    compiled graphs, where the compiler fuses the operations that :class:`CrossIterationNorm`
    writes by hand.
    """
    if past is None:
        mean, var = batch_mean, batch_var
    else:
        mean, var, _, _ = pool_with_past(batch_mean, batch_var, past)
    return normalize(input, mean, var, weight, bias, eps), PooledStatistics(batch_mean, batch_var, mean, var)


def traceable_cross_iteration_batch_norm(
    input: Tensor,
    past: PastStatistics | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    stats_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, PooledStatistics]:
    """:func:`cross_iteration_batch_norm` built from traceable operations (``torch.compile``).

    Same values and gradients, left to autograd; the returned statistics carry gradients.
    """
    stats_input = input if input.dtype == stats_dtype else input.to(stats_dtype)
    batch_var, batch_mean = torch.var_mean(stats_input, reduction_dims(input), correction=0)
    return pooled_normalization(input, batch_mean, batch_var, past, weight, bias, eps)
