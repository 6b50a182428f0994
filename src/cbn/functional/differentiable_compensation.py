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


def producer_gradients(
    jacobian: CompensationJacobian, grad_center: Tensor, grad_share: Tensor, inv_entries: Tensor,
    weight: Tensor, bias: Tensor | None, needs_weight: bool = True, needs_bias: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dL/dW, dL/db)`` of the producer from ``dL/dc`` and ``dL/d(P/n)`` (``(C,)`` each)::

        dL/dW = dL/dc dc/dW + dL/dP dP/dW,   dL/db = dL/dc dc/db + dL/dP dP/db,   dL/dP = dL/d(P/n) / n

    ``weight``, ``bias``: the producer's (for the shape and dtype of their gradients).
    """
    grad_spread = grad_share * inv_entries
    grad_weight = grad_bias = None
    if needs_weight:
        rows = torch.addcmul(jacobian.center_rows * grad_center.unsqueeze(1), jacobian.spread_rows,
                             grad_spread.unsqueeze(1))
        grad_weight = rows.view(weight.shape)
        if grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
    if needs_bias and bias is not None:
        grad_bias = torch.addcmul(jacobian.center_bias * grad_center, jacobian.spread_bias, grad_spread)
        if grad_bias.dtype != bias.dtype:
            grad_bias = grad_bias.to(bias.dtype)
    return grad_weight, grad_bias


class _AttachedPast(torch.autograd.Function):
    """``(c, P/n)`` as functions of the producer's weight and bias, with Jacobians given."""

    @staticmethod
    def forward(ctx, weight, bias, center, spread_share, inv_entries, jacobian):
        ctx.jacobian, ctx.weight, ctx.bias = jacobian, weight.detach(), None if bias is None else bias.detach()
        ctx.save_for_backward(inv_entries)
        return center.clone(), spread_share.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_center, grad_share):
        (inv_entries,) = ctx.saved_tensors
        zeros = torch.zeros_like(ctx.jacobian.center_bias)
        grads = producer_gradients(
            ctx.jacobian, zeros if grad_center is None else grad_center, zeros if grad_share is None else grad_share,
            inv_entries, ctx.weight, ctx.bias, *ctx.needs_input_grad[:2],
        )
        return *grads, None, None, None, None


def attach_to_producer(jacobian: CompensationJacobian, weight: Tensor, bias: Tensor | None) -> PastStatistics:
    """``jacobian.past`` as a function of the producer's ``weight`` and ``bias``.

    Args:
        jacobian: from :func:`compensation_jacobians`, at these weights.
        weight: the producer's weight as :func:`cbn.functional.statistic_gradients.shift_weight`
            gives it (``C`` rows of ``fan_in`` up to a reshape), carrying gradients.
        bias: the producer's bias, or ``None``.

    Returns:
        Eagerly, the summary with ``attachment = (weight, bias, jacobian)``: the normalization
        (:func:`cbn.functional.cross_iteration_batch_norm`, C++ kernel or Python) turns its
        ``dL/dc`` and ``dL/d(P/n)`` into the producer's gradients in its own backward (no extra
        autograd node); :func:`apply_attachment` makes ``center`` and ``spread_share`` carry them
        for any other consumer (:func:`cbn.functional.normalization.pooled_normalization` calls it).

        In a compiled graph, ``center``, ``spread`` and ``spread_share`` with terms whose value is zero::

            c = c_0 + sum_f (dc/dW)[c, f] (W - sg(W))[c, f] + (dc/db)[c] (b - sg(b))

        (``sg``: stop-gradient), and likewise ``P``, from which autograd derives the same gradients.
        Why not the attachment there: the compiler places computations that only the backward
        needs in the backward graph, where they would read the window's buffers after the step's
        record has overwritten them (the graph keeps no copy of a mutated input). Here the
        Jacobians are needed by the forward, and come out of matrix products, which the
        compiler's partitioner never recomputes in the backward: they are computed in the
        forward and saved.
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
    return past._replace(attachment=(weight, bias, jacobian))


def apply_attachment(past: PastStatistics) -> PastStatistics:
    """``past`` with its attachment turned into gradients of ``center`` and ``spread_share`` (a small
    autograd function), for consumers that pool it with plain autograd operations."""
    if past.attachment is None or past.attachment[0] is None:  # (unattached: values only)
        return past._replace(attachment=None)
    weight, bias, jacobian = past.attachment
    center, spread_share = _AttachedPast.apply(weight, bias, past.center, past.spread_share, past.inv_entries,
                                               jacobian)
    return past._replace(center=center, spread_share=spread_share, attachment=None)


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
        :class:`PastStatistics` with the values of :func:`cbn.functional.window.pool_window`,
        attached to ``weight`` and ``bias`` (:func:`attach_to_producer`).

    Example::

        >>> conv = nn.Conv2d(3, 4, 3)
        >>> stats = torch.zeros(2, 5, 4); stats[:, 4] = 18.0  # two valid entries
        >>> mean_grad, var_grad = torch.randn(1, 2, 27), torch.randn(4, 2, 27)
        >>> with torch.no_grad():
        ...     shifts = statistic_shifts(StatisticGradients(mean_grad, var_grad), conv.weight, conv.bias)
        >>> past = differentiable_past(stats, mean_grad, var_grad, conv.weight, conv.bias, *shifts)
        >>> out, _ = cross_iteration_batch_norm(torch.randn(2, 4, 5, 5), past, None, None, 1e-5)
        >>> out.square().sum().backward()  # conv.weight.grad: through the past summary
    """
    (jacobian,) = compensation_jacobians(stats, mean_shift_now, var_shift_now, [(mean_grad, var_grad)])
    return attach_to_producer(jacobian, weight, bias)
