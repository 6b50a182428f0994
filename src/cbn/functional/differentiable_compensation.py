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

One pass over the window, made before the forward (:func:`compensation_jacobians`, with the
per-channel work of all layers of a model in one chain): it forms the Jacobian rows ``dc/dW`` and
``dP/dW`` (two weight-sized tensors per layer), so that the backward reads none of the window's
buffers, which the step's record overwrites before the backward runs. The backward is then two
products per layer (:func:`attach_to_producer`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .window import PastStatistics, move_to_current_weights, pool_past

# Rows of a window's statistics tensor (as in ``window.pool_window``).
_MEAN, _VAR, _MEAN_SHIFT, _VAR_SHIFT, _SAMPLES = range(5)


class CompensationJacobian(NamedTuple):
    """A window's summary and its derivatives with respect to the producer's weight rows and bias.

    ``past`` holds the values of :func:`cbn.functional.window.pool_window` (no gradients);
    ``center_rows`` ``= dc/dW`` and ``spread_rows`` ``= dP/dW`` have shape ``(C, fan_in)``,
    ``center_bias`` ``= dc/db`` and ``spread_bias`` ``= dP/db`` shape ``(C,)``.
    """

    past: PastStatistics
    center_rows: Tensor
    spread_rows: Tensor
    center_bias: Tensor
    spread_bias: Tensor


@torch.no_grad()
def compensation_jacobians(
    stats: Tensor, mean_shift_now: Tensor, var_shift_now: Tensor, gradients: list[tuple[Tensor, Tensor]]
) -> list[CompensationJacobian]:
    """Summaries of moved windows and their Jacobians, for one layer or several at once.

    Args:
        stats: ``(k, 5, C)`` window (rows ``mean, var, mean_shift, var_shift, samples``); the
            windows of several layers concatenated along ``C``.
        mean_shift_now, var_shift_now: ``(k, C)`` first-order terms at the current weights
            (:func:`cbn.functional.statistic_shifts`), concatenated likewise.
        gradients: per layer, its window's statistic gradients ``(mean_grad, var_grad)``,
            ``(groups, k, fan_in)`` and ``(C_l, k, fan_in)``, in the order of the concatenation.

    Returns:
        One :class:`CompensationJacobian` per layer. The per-channel work is done once for the
        concatenation; only the Jacobian rows (one pass over a layer's window) are per layer.

    Example::

        >>> stats = torch.zeros(2, 5, 4); stats[:, 4] = 18.0  # two valid entries
        >>> mean_grad, var_grad = torch.randn(1, 2, 27), torch.randn(4, 2, 27)
        >>> shifts = statistic_shifts(StatisticGradients(mean_grad, var_grad), torch.randn(4, 27), None)
        >>> (jacobian,) = compensation_jacobians(stats, *shifts, [(mean_grad, var_grad)])
        >>> jacobian.spread_rows.shape
        torch.Size([4, 27])
    """
    mean, var, mean_shift, var_shift, samples = stats.unbind(1)
    moved_mean, moved_var = move_to_current_weights(mean, var, mean_shift, var_shift, mean_shift_now, var_shift_now)
    valid = (samples > 0).to(mean.dtype)
    past = pool_past(moved_mean, moved_var, valid)._replace(samples=samples.sum(0))
    delta = mean_shift_now - mean_shift
    # The clamp's gradient is zero where it acts (var' = 0 after the clamp; at exactly zero
    # either side is a valid subgradient).
    kept = valid * (moved_var > 0).to(mean.dtype)  # q
    center_weight = valid / past.count.clamp_min(1)  # w
    spread_weight = 2 * (valid * (moved_mean - past.center) - kept * delta)  # p
    # (2, C, k): the coefficients of the mean patches, a layer's rows contiguous in the last dim.
    coefficients = torch.stack((center_weight, spread_weight)).transpose(1, 2).contiguous()
    # d mu'/db = 1: the bias derivatives sum the per-entry coefficients (as a product in a
    # compiled graph: see attach_to_producer).
    if torch.compiler.is_compiling():
        bias_sums = torch.matmul(coefficients, coefficients.new_ones(coefficients.shape[2], 1))[..., 0]
    else:
        bias_sums = coefficients.sum(2)
    sizes = [var_grad.shape[0] for _, var_grad in gradients]
    parts = zip(
        zip(*(t.split(sizes) if t is not None else [None] * len(sizes) for t in past)),
        coefficients.split(sizes, dim=1), kept.unsqueeze(2).split(sizes, dim=1), bias_sums.split(sizes, dim=1),
        gradients,
    )
    jacobians = []
    for layer_past, layer_coefficients, layer_kept, (center_bias, spread_bias), (mean_grad, var_grad) in parts:
        center_rows, spread_rows = _jacobian_rows(mean_grad, var_grad, layer_coefficients, layer_kept)
        jacobians.append(CompensationJacobian(PastStatistics(*layer_past), center_rows, spread_rows,
                                              center_bias, spread_bias))
    return jacobians


def _jacobian_rows(mean_grad: Tensor, var_grad: Tensor, coefficients: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """``(dc/dW, dP/dW)``, each ``(C, fan_in)``: ``sum_tau w G_mu`` and ``sum_tau p G_mu + q G_var``
    (module doc), one pass over the window. ``coefficients``: ``(2, C, k)``, ``w`` and ``p``;
    ``kept``: ``(k, C, 1)``, ``q``."""
    groups, entries, fan_in = mean_grad.shape
    channels = coefficients.shape[1]
    # Contiguous whether the layer was prepared alone or with others: the same product, bit for bit.
    coefficients = coefficients.contiguous()
    if groups == 1:
        rows = torch.matmul(coefficients, mean_grad[0])
    else:
        per_group = coefficients.reshape(2, groups, channels // groups, entries).transpose(0, 1)
        rows = torch.bmm(per_group.reshape(groups, -1, entries), mean_grad)
        rows = rows.reshape(groups, 2, channels // groups, fan_in).transpose(0, 1).reshape(2, channels, fan_in)
    center_rows, spread_rows = rows.unbind(0)
    if torch.compiler.is_compiling():
        # A matrix product: see attach_to_producer.
        return center_rows, spread_rows + torch.bmm(kept.permute(1, 2, 0), var_grad).squeeze(1)
    # + sum_tau q[tau, c] G_var[tau, c], without a window-sized temporary (faster than a
    # batched product on CPU).
    for slot, weight in zip(var_grad.unbind(1), kept.unbind(0)):
        spread_rows.addcmul_(slot, weight)
    return center_rows, spread_rows


class _AttachedPast(torch.autograd.Function):
    """``(c, P/n)`` as functions of the producer's weight and bias, with Jacobians given."""

    @staticmethod
    def forward(ctx, weight, bias, center, spread_share, inv_entries, center_rows, spread_rows,
                center_bias, spread_bias):
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(inv_entries, center_rows, spread_rows, center_bias, spread_bias)
        return center.clone(), spread_share.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_center, grad_share):
        inv_entries, center_rows, spread_rows, center_bias, spread_bias = ctx.saved_tensors
        if grad_center is None:
            grad_center = torch.zeros_like(center_bias)
        if grad_share is None:
            grad_share = torch.zeros_like(center_bias)
        grad_spread = grad_share * inv_entries  # dL/dP, through P/n
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            rows = torch.addcmul(center_rows * grad_center.unsqueeze(1), spread_rows, grad_spread.unsqueeze(1))
            grad_weight = rows.view(ctx.weight_shape)
            if grad_weight.dtype != ctx.weight_dtype:
                grad_weight = grad_weight.to(ctx.weight_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = torch.addcmul(center_bias * grad_center, spread_bias, grad_spread)
            if grad_bias.dtype != ctx.bias_dtype:
                grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_weight, grad_bias, *([None] * 7)


def attach_to_producer(jacobian: CompensationJacobian, weight: Tensor, bias: Tensor | None) -> PastStatistics:
    """``jacobian.past`` with ``center`` and ``spread_share`` differentiable in ``weight``, ``bias``.

    The pooling reads the spread as ``spread_share = P/n`` (:func:`cbn.functional.window.pooling_weights`);
    ``spread`` itself is left as a value (in a compiled graph it carries gradients too).

    Args:
        jacobian: from :func:`compensation_jacobians`, at these weights.
        weight: the producer's weight as :func:`cbn.functional.statistic_gradients.shift_weight`
            gives it (``C`` rows of ``fan_in`` up to a reshape), carrying gradients.
        bias: the producer's bias, or ``None``.

    Eagerly a custom autograd function whose backward is ``g_c dc/dW + g_P dP/dW`` (and the same
    for the bias). In a compiled graph, terms whose value is zero::

        c = c_0 + sum_f (dc/dW)[c, f] (W - sg(W))[c, f] + (dc/db)[c] (b - sg(b))

    (``sg``: stop-gradient), and likewise ``P``, from which autograd derives the same gradients.
    Why not the function there: the compiler places computations that only the backward needs
    in the backward graph, where they would read the window's buffers after the step's record
    has overwritten them (the graph keeps no copy of a mutated input). Here the Jacobians are
    needed by the forward, and come out of matrix products, which the compiler's partitioner
    never recomputes in the backward: they are computed in the forward and saved.
    """
    past = jacobian.past
    if past.inv_entries is None:
        from .window import with_pooling_weights

        past = with_pooling_weights(past)
    if torch.compiler.is_compiling():
        channels = jacobian.center_rows.shape[0]
        weight_step = (weight - weight.detach()).reshape(channels, -1).to(jacobian.center_rows.dtype)
        center = past.center + (jacobian.center_rows * weight_step).sum(1)
        spread = past.spread + (jacobian.spread_rows * weight_step).sum(1)
        if bias is not None:
            bias_step = (bias - bias.detach()).to(jacobian.center_rows.dtype)
            center = center + jacobian.center_bias * bias_step
            spread = spread + jacobian.spread_bias * bias_step
        return past._replace(center=center, spread=spread, spread_share=spread * past.inv_entries)
    center, spread_share = _AttachedPast.apply(
        weight, bias, past.center, past.spread_share, past.inv_entries,
        jacobian.center_rows, jacobian.spread_rows, jacobian.center_bias, jacobian.spread_bias,
    )
    return past._replace(center=center, spread_share=spread_share)


def differentiable_past(
    stats: Tensor,
    mean_grad: Tensor,
    var_grad: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mean_shift_now: Tensor,
    var_shift_now: Tensor,
) -> PastStatistics:
    """The summary of one layer's window moved to the current weights, differentiable in
    ``weight`` and ``bias``: :func:`compensation_jacobians` then :func:`attach_to_producer`.

    Args:
        stats: ``(k, 5, C)`` window (rows ``mean, var, mean_shift, var_shift, samples``).
        mean_grad, var_grad: its statistic gradients, ``(groups, k, fan_in)`` and ``(C, k, fan_in)``.
        weight: the producer's weight as :func:`cbn.functional.statistic_gradients.shift_weight`
            gives it, carrying gradients; ``bias``: its bias, or ``None``.
        mean_shift_now, var_shift_now: ``(k, C)`` first-order terms at ``weight``, ``bias``
            (:func:`cbn.functional.statistic_shifts`, computed without gradients).

    Returns:
        :class:`PastStatistics` with the values of :func:`cbn.functional.window.pool_window`;
        ``center`` and ``spread_share`` (what the pooling reads) carry the gradients of the
        module formula.

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
    (jacobian,) = compensation_jacobians(stats, mean_shift_now, var_shift_now, [(mean_grad, var_grad)])
    return attach_to_producer(jacobian, weight, bias)
