"""The differentiable part of Cross-Iteration BatchNorm: pooling the current batch with the past.

Given the current batch statistics ``mu_t, var_t`` (``m`` values per channel) and the constants
``(c, P, n - 1)`` that summarize the ``n - 1`` past entries moved to the current weights
(``window.py``), the pooled statistics of ``docs/method.md``,
``mu_bar = (1/n) sum mu_tau`` and ``var_bar = (1/n) sum nu_tau - mu_bar^2``, are::

    delta   = mu_t - c
    mu_bar  = c + delta / n
    var_bar = (var_t + P + (n - 1) / n * delta^2) / n

an exact rearrangement (the parallel-variance identity) that never subtracts two large raw
moments. The output is ``y = (x - mu_bar) / sqrt(var_bar + eps) * gamma + beta``.

Gradients flow through ``mu_t`` and ``var_t`` only (past entries are constants). With
``g = dL/dy``, ``s = 1/sqrt(var_bar + eps)``, ``x_hat = (x - mu_bar) s``, ``G = sum g`` and
``H = sum g * x_hat`` over a channel, the chain rule through ``mu_t`` and ``var_t`` collapses to::

    dL/dx     = gamma s (g - (G + x_hat H) / (n m))
    dL/dgamma = H                          dL/dbeta = G

(the terms of ``dL/dmu_bar`` and ``dL/dvar_bar`` combine because ``x - mu_t + (n - 1) delta / n
= x - mu_bar``): BatchNorm's own backward with the ``m`` values of the batch counted as the
``n m`` values pooled. :class:`CrossIterationNorm` implements it by hand: one fused BatchNorm
backward kernel gives ``gamma s g``, ``G`` and ``H``, one BatchNorm forward kernel the
per-channel correction ``-gamma s (G + x_hat H) / (n m)``, instead of the dozens of small
operations autograd would record. The backward is not itself differentiable (no double
backward, as with the statistics of SyncBatchNorm).

The past summary ``(c, P / n)`` may itself carry gradients (differentiable compensation,
``differentiable_compensation.py``). Its gradients are per-channel sums the backward already has:
with ``A = dL/dmu_bar = -gamma s G`` and ``B = dL/dvar_bar = -gamma s^2 H / 2``, and
``delta (n - 1) / n^2 = (mu_bar - c) (1 - 1/n)``::

    dL/dc       = (1 - 1/n) (A - 2 B (mu_bar - c))
    dL/d(P / n) = B
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import kernels
from .._cache import bounded_get
from .differentiable_compensation import apply_attachment, attachment_operands
from .window import PastStatistics, with_pooling_weights

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class PooledStatistics(NamedTuple):
    """Per-channel statistics of one training forward: ``(C,)`` tensors in the statistics dtype."""

    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor


def reduction_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def pool_with_past(batch_mean: Tensor, batch_var: Tensor, past: PastStatistics) -> tuple[Tensor, Tensor]:
    """Pooled ``(mean, var)`` of the module formula, differentiable in ``batch_mean`` and
    ``batch_var`` when called under autograd (the cross-process path does). The pooling weights
    of ``past`` are used when it carries them (:func:`cbn.functional.window.pool_past`).
    """
    past = with_pooling_weights(past)
    delta = batch_mean - past.center
    mean = torch.addcmul(past.center, delta, past.inv_entries)
    var = torch.addcmul(torch.addcmul(past.spread_share, batch_var, past.inv_entries), delta.square(), past.delta_weight)
    return mean, var


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
    def forward(ctx, input, weight, bias, center, spread_share, past, eps, stats_dtype):
        # ``center`` and ``spread_share`` are ``past``'s own, passed apart so that autograd sees
        # them when they carry gradients (differentiable compensation); ``None`` without a past.
        ctx.eps = eps
        if past is None and input.dtype == stats_dtype:
            output, batch_mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
            batch_var = invstd.pow(-2).sub_(eps)
            ctx.pooled = False
            ctx.save_for_backward(input, weight, batch_mean, invstd)
            ctx.mark_non_differentiable(batch_mean, batch_var)
            return output, batch_mean, batch_var, batch_mean, batch_var
        # BatchNorm's statistics kernel: far faster on CPU than var_mean over (0, 2, ...).
        batch_mean, batch_var = torch.batch_norm_update_stats(
            input if input.dtype == stats_dtype else input.to(stats_dtype), None, None, 0.0
        )
        if past is not None:
            past = PastStatistics(*past)
            mean, var = pool_with_past(batch_mean, batch_var, past)
            inv_entries = past.inv_entries
        else:
            mean, var, inv_entries = batch_mean, batch_var, batch_mean.new_ones(())
        # Eval-mode BatchNorm with the pooled statistics is exactly the normalization wanted.
        output = torch.native_batch_norm(input, weight, bias, mean, var, False, 0.0, eps)[0]
        ctx.pooled = True
        ctx.save_for_backward(input, weight, mean, var, inv_entries, center)
        ctx.mark_non_differentiable(batch_mean, batch_var, mean, var)
        return output, batch_mean, batch_var, mean, var

    @staticmethod
    def backward(ctx, grad_output, *unused):
        if torch.is_grad_enabled():  # create_graph=True: a gradient of this gradient is wanted
            raise RuntimeError(
                "cbn: the backward of the pooled normalization is not differentiable (no double backward, "
                "e.g. a gradient penalty with create_graph=True) once a Cross-Iteration BatchNorm layer pools "
                "past statistics; with window=1 and during burn-in it is BatchNorm's, which is")
        return CrossIterationNorm._backward(ctx, grad_output)

    @staticmethod
    @once_differentiable
    def _backward(ctx, grad_output):
        needs_input, needs_weight, needs_bias, needs_center, needs_share = ctx.needs_input_grad[:5]
        needs_summary = needs_center or needs_share
        saved = ctx.saved_tensors
        input = saved[0]
        grad_output = grad_output.contiguous(memory_format=_memory_format(input))
        if not ctx.pooled:
            input, weight, batch_mean, invstd = saved
            grads = torch.ops.aten.native_batch_norm_backward(
                grad_output, input, weight, None, None, batch_mean, invstd, True, ctx.eps,
                [needs_input, needs_weight, needs_bias],
            )
            return (*grads, None, None, None, None, None)
        input, weight, mean, var, inv_entries, center = saved
        needs_sums = needs_input or needs_summary
        grad_input, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_output, input, weight, mean, var, None, None, False, ctx.eps,
            [needs_input, needs_weight or needs_sums, needs_bias or needs_sums],
        )
        grad_center = grad_share = None
        if needs_summary:
            grad_center, grad_share = past_summary_gradients(
                sum_g, sum_g_xhat, weight, mean, var, inv_entries, center, ctx.eps
            )
        if needs_input:
            # gamma s g from the kernel above, then - gamma s (G + x_hat H) / (n m), which is
            # BatchNorm's forward of the input with scale -gamma s^2 H / (n m), shift -gamma s G / (n m).
            invstd = torch.rsqrt(var + ctx.eps)
            scale = invstd.mul(inv_entries).mul_(-input.shape[1] / input.numel())
            if weight is not None:
                scale.mul_(weight)
            correction = torch.native_batch_norm(
                input, scale * invstd * sum_g_xhat, scale * sum_g,
                mean, _unit_variance(var), False, 0.0, 0.0,
            )[0]
            grad_input.add_(correction)
        return (
            grad_input,
            sum_g_xhat if needs_weight else None,
            sum_g if needs_bias else None,
            grad_center if needs_center else None,
            grad_share if needs_share else None,
            None, None, None,
        )


def past_summary_gradients(
    sum_g: Tensor, sum_g_xhat: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor,
    inv_entries: Tensor, center: Tensor, eps: float,
) -> tuple[Tensor, Tensor]:
    """``(dL/dc, dL/d(P/n))`` of the past summary from the per-channel sums of the backward.

    With ``s = 1/sqrt(var_bar + eps)``, ``G = sum g`` and ``H = sum g x_hat`` over a channel::

        A = dL/dmu_bar = -gamma s G          B = dL/dvar_bar = -gamma s^2 H / 2
        dL/dc = (1 - 1/n) (A - 2 B (mu_bar - c))          dL/d(P/n) = B

    Args:
        sum_g, sum_g_xhat: ``G`` and ``H``, ``(C,)``.
        weight: ``gamma`` ``(C,)`` or ``None``.
        mean, var: the pooled statistics ``mu_bar``, ``var_bar``; ``inv_entries``: ``1/n``;
            ``center``: ``c`` (all ``(C,)`` or broadcastable, in the statistics dtype).
        eps: as in the forward.

    Returns:
        Two ``(C,)`` tensors in the dtype of ``mean``.
    """
    dtype = mean.dtype
    invstd = torch.rsqrt(var + eps)
    gamma_s = invstd if weight is None else invstd * weight.to(dtype)
    grad_mean = -gamma_s * sum_g.to(dtype)
    grad_var = -0.5 * gamma_s * invstd * sum_g_xhat.to(dtype)
    grad_center = (1 - inv_entries) * (grad_mean - 2 * grad_var * (mean - center))
    return grad_center, grad_var


_UNIT: dict[tuple, Tensor] = {}


def _unit_variance(like: Tensor) -> Tensor:
    """A cached tensor of ones like ``like``: the variance that makes BatchNorm's kernel affine."""
    return bounded_get(_UNIT, (like.shape, like.dtype, like.device), lambda: torch.ones_like(like), 64)


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
            gives BatchNorm. Where its ``center`` and ``spread_share`` carry gradients, the
            backward gives them theirs; where it has an ``attachment`` (differentiable
            compensation, :func:`cbn.functional.differentiable_compensation.attach_to_producer`),
            they are made to carry the producer's (:func:`apply_attachment`).
        weight, bias: optional affine parameters ``(C,)``.
        eps: added to the pooled variance inside the square root.
        stats_dtype: dtype of the statistics (float32 or wider).

    Returns:
        The normalized tensor (``input``'s shape and dtype) and the statistics it used.

    With a window to pool and :mod:`cbn.kernels` active (outside compiled graphs), the C++
    kernel ``cbn::pooled_normalization`` computes it; else :class:`CrossIterationNorm`.

    Example::

        >>> past = PastStatistics(torch.zeros(3), torch.zeros(3), torch.tensor(0.0))
        >>> out, stats = cross_iteration_batch_norm(torch.randn(4, 3, 5), past, None, None, 1e-5)
    """
    if weight is not None and weight.dtype in _LOW_PRECISION:
        # A model cast with .half(): BatchNorm's kernels take low-precision inputs with
        # parameters in the statistics' dtype, not low-precision parameters beside float statistics.
        weight = weight.to(stats_dtype)
        bias = bias.to(stats_dtype) if bias is not None else None
    if past is None and input.dtype == stats_dtype:
        # BatchNorm itself, with autograd's own (twice differentiable) backward.
        output, batch_mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
        batch_mean = batch_mean.detach()
        batch_var = invstd.detach().pow(-2).sub_(eps)
        return output, PooledStatistics(batch_mean, batch_var, batch_mean, batch_var)
    if past is not None:
        past = with_pooling_weights(past)
    if past is not None and kernels.active():
        output, *stats = torch.ops.cbn.pooled_normalization(
            input, weight, bias, past.center, past.inv_entries, past.spread_share, past.delta_weight, eps, stats_dtype,
            *attachment_operands(past),
        )
    else:
        past = None if past is None else apply_attachment(past)
        center, share = (None, None) if past is None else (past.center, past.spread_share)
        output, *stats = CrossIterationNorm.apply(input, weight, bias, center, share, past, eps, stats_dtype)
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
        mean, var = pool_with_past(batch_mean, batch_var, apply_attachment(past))
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
