"""Differentiable compensation: the past summary as a function of the producer's current weights.

The Taylor-moved past entries of a window (``window.py``) are functions of the producer's current
weight rows ``W[c]`` and bias ``b[c]``: with ``G_mu[tau]`` the stored mean patch of entry ``tau``
(shared by the channels of a group) and ``G_var[tau, c]`` its variance gradient::

    mu'[tau, c]  = mu[tau, c] + delta[tau, c],        delta = G_mu[tau] . W[c] + b[c] - s_mu[tau, c]
    var'[tau, c] = max(var[tau, c] + G_var[tau, c] . W[c] - s_var[tau, c] - delta^2, 0)

so, where the clamp is not active (``m[tau, c] = 1``; ``0`` where it is, whose gradient is zero)::

    d mu'/dW[c]  = G_mu[tau]                       d mu'/db[c]  = 1
    d var'/dW[c] = G_var[tau, c] - 2 delta G_mu[tau]   d var'/db[c] = -2 delta

The paper treats them as constants in backward. Here the summary of the ``K`` valid entries
(``v[tau] = 1``), ``c = (1/K) sum v mu'`` and ``P = sum v (var' + (mu' - c)^2)``, is differentiable
in ``W`` and ``b``. The chain rule (``sum v (mu' - c) = 0`` removes the dependence of ``P`` on ``c``)
gives, per channel::

    d c / d W[c] = sum_tau w[tau] G_mu[tau]                               w = v / K
    d P / d W[c] = sum_tau p[tau] G_mu[tau] + sum_tau q[tau] G_var[tau, c]
                   p = 2 v ((mu' - c) - m delta),   q = v m
    d c / d b[c] = sum_tau w[tau],                d P / d b[c] = sum_tau p[tau]

and with the gradients ``g_c = dL/dc`` and ``g_P = dL/dP`` the pooled normalization's backward
gives (``normalization.past_summary_gradients``)::

    dL/dW[c] = sum_tau (g_c w + g_P p)[tau] G_mu[tau] + g_P V[c],      V[c] = sum_tau q[tau] G_var[tau, c]
    dL/db[c] = sum_tau (g_c w + g_P p)[tau]

One pass over the window. The forward forms ``V`` (weight-sized) and keeps a copy of the mean
patches (``k x fan_in`` per group): the window's buffers are overwritten by the step's record
before the backward runs, so the backward reads neither.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .window import PastStatistics, move_to_current_weights, pool_past, pooling_weights

# Rows of a window's statistics tensor (as in ``window.pool_window``).
_MEAN, _VAR, _MEAN_SHIFT, _VAR_SHIFT, _SAMPLES = range(5)


def _moved_window(stats: Tensor, mean_shift_now: Tensor, var_shift_now: Tensor):
    """Moved entries, their summary (the values of :func:`cbn.functional.window.pool_window`,
    computed by the same operations) and the backward's coefficients ``w``, ``p``, ``q``."""
    mean, var, mean_shift, var_shift, samples = stats.unbind(1)
    moved_mean, moved_var = move_to_current_weights(mean, var, mean_shift, var_shift, mean_shift_now, var_shift_now)
    valid = (samples > 0).to(mean.dtype)
    past = pool_past(moved_mean, moved_var, valid)
    delta = mean_shift_now - mean_shift
    # The clamp's gradient is zero where it acts (var' = 0 after the clamp; at exactly zero
    # either side is a valid subgradient).
    kept = valid * (moved_var > 0).to(mean.dtype)
    center_weight = valid / past.count.clamp_min(1)
    spread_weight = 2 * (valid * (moved_mean - past.center) - kept * delta)
    return past, samples.sum(0), center_weight, spread_weight, kept


class CompensatedPast(torch.autograd.Function):
    """``(center, spread)`` of a moved window, differentiable in the producer's weight and bias.

    Forward: the same values as :func:`cbn.functional.window.pool_window`. Backward: the module
    formula, one pass over the window.
    """

    @staticmethod
    def forward(ctx, weight, bias, stats, mean_grad, var_grad, mean_shift_now, var_shift_now):
        past, samples, center_weight, spread_weight, kept = _moved_window(stats, mean_shift_now, var_shift_now)
        variance_rows = None
        if ctx.needs_input_grad[0]:
            # V[c] = sum_tau q[tau, c] G_var[tau, c]: one pass over the window's variance gradients,
            # without a window-sized temporary.
            variance_rows = torch.zeros(var_grad.shape[0], var_grad.shape[2], dtype=var_grad.dtype,
                                        device=var_grad.device)
            for tau in range(var_grad.shape[1]):
                variance_rows.addcmul_(var_grad[:, tau], kept[tau].unsqueeze(1))
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(
            center_weight, spread_weight, mean_grad.clone() if ctx.needs_input_grad[0] else None, variance_rows
        )
        ctx.mark_non_differentiable(past.count, samples)
        return past.center, past.spread, past.count, samples

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_center, grad_spread, _count, _samples):
        center_weight, spread_weight, mean_grad, variance_rows = ctx.saved_tensors
        dtype = center_weight.dtype
        channels = center_weight.shape[1]
        grad_center = torch.zeros(channels, dtype=dtype, device=center_weight.device) \
            if grad_center is None else grad_center.to(dtype)
        grad_spread = torch.zeros_like(grad_center) if grad_spread is None else grad_spread.to(dtype)
        # Per entry and channel: dL/dmu'[tau, c] with the variance's mean-patch term folded in.
        coefficients = torch.addcmul(center_weight * grad_center, spread_weight, grad_spread)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            groups, entries, fan_in = mean_grad.shape
            if groups == 1:
                rows = torch.mm(coefficients.t(), mean_grad[0])
            else:
                per_group = coefficients.t().reshape(groups, channels // groups, entries)
                rows = torch.bmm(per_group, mean_grad).reshape(channels, fan_in)
            rows.addcmul_(variance_rows, grad_spread.unsqueeze(1))
            grad_weight = rows.reshape(ctx.weight_shape).to(ctx.weight_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = coefficients.sum(0).to(ctx.bias_dtype)
        return grad_weight, grad_bias, None, None, None, None, None


def differentiable_past(
    stats: Tensor,
    mean_grad: Tensor,
    var_grad: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mean_shift_now: Tensor,
    var_shift_now: Tensor,
) -> PastStatistics:
    """The summary of a window moved to the current weights, differentiable in ``weight`` and ``bias``.

    Args:
        stats: ``(k, 5, C)`` window (rows ``mean, var, mean_shift, var_shift, samples``).
        mean_grad, var_grad: its statistic gradients, ``(groups, k, fan_in)`` and ``(C, k, fan_in)``.
        weight: the producer's weight as :func:`cbn.functional.statistic_gradients.shift_weight`
            gives it (``C`` rows of ``fan_in`` up to a reshape), carrying gradients.
        bias: the producer's bias, or ``None``.
        mean_shift_now, var_shift_now: ``(k, C)`` first-order terms at ``weight``, ``bias``
            (:func:`cbn.functional.statistic_shifts`, computed without gradients).

    Returns:
        :class:`PastStatistics` with the values of :func:`cbn.functional.window.pool_window`;
        ``center``, ``spread`` and ``spread_share`` carry the gradients of the module formula.

    Example::

        >>> conv = nn.Conv2d(3, 4, 3)
        >>> stats = torch.zeros(2, 5, 4); stats[:, 4] = 18.0  # two valid entries
        >>> mean_grad, var_grad = torch.randn(1, 2, 27), torch.randn(4, 2, 27)
        >>> with torch.no_grad():
        ...     shifts = statistic_shifts(StatisticGradients(mean_grad, var_grad), conv.weight, conv.bias)
        >>> past = differentiable_past(stats, mean_grad, var_grad, conv.weight, conv.bias, *shifts)
        >>> past.center.requires_grad
        True
    """
    center, spread, count, samples = CompensatedPast.apply(
        weight, bias, stats, mean_grad, var_grad, mean_shift_now, var_shift_now
    )
    return PastStatistics(center, spread, count, samples, *pooling_weights(count, spread))


def traceable_differentiable_past(
    stats: Tensor,
    mean_grad: Tensor,
    var_grad: Tensor,
    weight: Tensor,
    bias: Tensor | None,
) -> PastStatistics:
    """:func:`differentiable_past` as plain autograd operations, for a compiled graph.

    The first-order terms are taken at ``weight`` and ``bias`` with autograd on, and the move and
    the summary are the operations of :func:`cbn.functional.window.pool_window`, so autograd
    derives the same gradients. The compiler keeps the values the backward needs even where the
    window's buffers are overwritten later in the graph; eagerly, the in-place record would
    invalidate them, which is why the eager form is :class:`CompensatedPast`.
    """
    from .statistic_gradients import StatisticGradients, statistic_shifts
    from .window import pool_window

    mean_shift_now, var_shift_now = statistic_shifts(StatisticGradients(mean_grad, var_grad), weight, bias)
    return pool_window(stats, mean_shift_now, var_shift_now)
