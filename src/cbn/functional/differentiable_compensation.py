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

One pass over the window, made in the forward: it forms the Jacobian rows ``dc/dW`` and ``dP/dW``
(two weight-sized tensors), so that the backward reads none of the window's buffers, which the
step's record overwrites before the backward runs.
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

    Forward: the same values as :func:`cbn.functional.window.pool_window`, and the Jacobian rows
    ``dc/dW`` and ``dP/dW`` (one pass over the window). Backward: ``g_c dc/dW + g_P dP/dW``.
    """

    @staticmethod
    def forward(ctx, weight, bias, stats, mean_grad, var_grad, mean_shift_now, var_shift_now):
        past, samples, center_weight, spread_weight, kept = _moved_window(stats, mean_shift_now, var_shift_now)
        center_rows = spread_rows = None
        if ctx.needs_input_grad[0]:
            center_rows, spread_rows = _jacobian_rows(mean_grad, var_grad, center_weight, spread_weight, kept)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(center_weight, spread_weight, center_rows, spread_rows)
        ctx.mark_non_differentiable(past.count, samples)
        return past.center, past.spread, past.count, samples

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_center, grad_spread, _count, _samples):
        center_weight, spread_weight, center_rows, spread_rows = ctx.saved_tensors
        dtype = center_weight.dtype
        channels = center_weight.shape[1]
        grad_center = torch.zeros(channels, dtype=dtype, device=center_weight.device) \
            if grad_center is None else grad_center.to(dtype)
        grad_spread = torch.zeros_like(grad_center) if grad_spread is None else grad_spread.to(dtype)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            rows = torch.addcmul(center_rows * grad_center.unsqueeze(1), spread_rows, grad_spread.unsqueeze(1))
            grad_weight = rows.reshape(ctx.weight_shape).to(ctx.weight_dtype)
        if ctx.needs_input_grad[1]:
            # d mu'/db = 1: the bias gradient sums the per-entry coefficients.
            grad_bias = torch.addcmul(center_weight * grad_center, spread_weight, grad_spread).sum(0).to(ctx.bias_dtype)
        return grad_weight, grad_bias, None, None, None, None, None


def _jacobian_rows(mean_grad, var_grad, center_weight, spread_weight, kept) -> tuple[Tensor, Tensor]:
    """``(dc/dW, dP/dW)``, each ``(C, fan_in)``: ``sum_tau w G_mu`` and
    ``sum_tau p G_mu + q G_var`` (module doc), one pass over the window."""
    groups, entries, fan_in = mean_grad.shape
    channels = center_weight.shape[1]
    both = torch.cat((center_weight, spread_weight), dim=1).t()  # (2C, k)
    if groups == 1:
        rows = torch.mm(both, mean_grad[0])
    else:
        per_group = both.reshape(2, groups, channels // groups, entries).transpose(0, 1).reshape(groups, -1, entries)
        rows = torch.bmm(per_group, mean_grad).reshape(groups, 2, channels // groups, fan_in).transpose(0, 1)
        rows = rows.reshape(2 * channels, fan_in)
    center_rows, spread_rows = rows.split(channels)
    if torch.compiler.is_compiling():
        # A matmul: see traceable_differentiable_past.
        return center_rows, spread_rows + torch.bmm(kept.t().unsqueeze(1), var_grad).squeeze(1)
    # + sum_tau q[tau, c] G_var[tau, c], without a window-sized temporary.
    for tau in range(entries):
        spread_rows.addcmul_(var_grad[:, tau], kept[tau].unsqueeze(1))
    return center_rows, spread_rows


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
        Inside a ``torch.compile`` graph, :func:`traceable_differentiable_past` computes it.

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
    if torch.compiler.is_compiling():
        return traceable_differentiable_past(stats, mean_grad, var_grad, weight, bias, mean_shift_now, var_shift_now)
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
    mean_shift_now: Tensor,
    var_shift_now: Tensor,
) -> PastStatistics:
    """:func:`differentiable_past` as traceable operations, for a compiled graph.

    The summary and its Jacobian rows are computed without gradients, then attached to the
    weight and bias by terms whose value is zero::

        c = c_0 + sum_f (dc/dW)[c, f] (W - sg(W))[c, f] + (dc/db)[c] (b - sg(b))

    (``sg``: stop-gradient), and likewise ``P``: autograd then gives ``dL/dW = g_c dc/dW + g_P dP/dW``.
    Why not :class:`CompensatedPast` in the graph: the compiler places computations that only the
    backward needs in the backward graph, where they would read the window's buffers after the
    step's record has overwritten them (the graph keeps no copy of a mutated input). Here the
    Jacobian rows are needed by the forward, and come out of matrix products, which the
    compiler's partitioner never recomputes in the backward: they are computed in the forward
    and saved.
    """
    with torch.no_grad():
        past, samples, center_weight, spread_weight, kept = _moved_window(stats, mean_shift_now, var_shift_now)
        center_rows, spread_rows = _jacobian_rows(mean_grad, var_grad, center_weight, spread_weight, kept)
        ones = center_weight.new_ones(center_weight.shape[0], 1)
        center_bias, spread_bias = torch.mm(torch.cat((center_weight, spread_weight), dim=1).t(), ones).split(
            center_weight.shape[1])
    channels = center_rows.shape[0]
    weight_step = (weight - weight.detach()).reshape(channels, -1).to(center_rows.dtype)
    center = past.center + (center_rows * weight_step).sum(1)
    spread = past.spread + (spread_rows * weight_step).sum(1)
    if bias is not None:
        bias_step = (bias - bias.detach()).to(center_rows.dtype)
        center = center + center_bias[:, 0] * bias_step
        spread = spread + spread_bias[:, 0] * bias_step
    return PastStatistics(center, spread, past.count, samples,
                          *pooling_weights(past.count, spread))
