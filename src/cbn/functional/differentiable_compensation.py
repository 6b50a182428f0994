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

The per-channel work (``w``, ``p``, ``q``) is done in the forward, for all layers of a model in
one chain (:func:`compensation_coefficients`); the weight-sized work is one pass over the window
in the backward (:func:`producer_gradients`: the C++ kernel ``cbn::compensation_gradients`` on
the CPU, :func:`window_weight_gradient` otherwise), reading the statistic gradients the
forward's summary was computed from (:class:`WindowGradients`: the window's own slot tensors,
which the window never writes). Where the C++ kernels are active the
summary's autograd function is the C++ ``cbn::attach_past`` (no Python in the backward).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import kernels
from .statistic_gradients import gradient_slots, gradient_window
from .window import PastStatistics, move_to_current_weights, pool_past, summaries_in_kernel, with_pooling_weights

# Rows of a window's statistics tensor (as in ``window.pool_window``).
_MEAN, _VAR, _MEAN_SHIFT, _VAR_SHIFT, _SAMPLES = range(5)


class WindowGradients:
    """The statistic gradients a differentiable summary was computed from, as its backward reads them.

    ``mean_slots``: the ``k`` mean patches ``(groups, fan_in)``; ``var_slots``: the ``k`` variance
    gradients ``(C, fan_in)`` (a ``(rows, k, fan_in)`` window may be given instead of either: its
    slices). They are the window's own tensors, not copies: the window never writes them (a new
    entry replaces a slot's tensors, :mod:`cbn.layers.window_state`), so every backward of the
    summary reads the entries its forward pooled, whatever ran in between, in one pass.
    """

    def __init__(self, mean: Tensor | Sequence[Tensor], var: Tensor | Sequence[Tensor]) -> None:
        self.mean_slots, self.var_slots = gradient_slots(mean), gradient_slots(var)

    @property
    def mean(self) -> Tensor:
        """The mean patches as a window ``(groups, k, fan_in)`` (a copy)."""
        return gradient_window(self.mean_slots)

    @property
    def var(self) -> Tensor:
        """The variance gradients as a window ``(C, k, fan_in)`` (a copy)."""
        return gradient_window(self.var_slots)


class CompensationTerms(NamedTuple):
    """A window's summary and the per-entry coefficients of its derivatives in the producer's
    weight rows and bias (module doc): ``coefficients`` ``(C, 3, k)``, per channel the rows ``w``,
    ``p`` and ``q`` (1 where the variance clamp is inactive), contiguous per channel for the
    backward's pass. ``gradients``: the statistic gradients they multiply (:class:`WindowGradients`),
    given by the window at the call."""

    past: PastStatistics
    coefficients: Tensor
    gradients: WindowGradients | None = None

    @property
    def center_weights(self) -> Tensor:
        """``w``, ``(k, C)``."""
        return self.coefficients[:, 0].t()

    @property
    def spread_weights(self) -> Tensor:
        """``p``, ``(k, C)``."""
        return self.coefficients[:, 1].t()

    @property
    def unclamped(self) -> Tensor:
        """``q``, ``(k, C)``."""
        return self.coefficients[:, 2].t()


@torch.no_grad()
def compensation_coefficients(
    stats: Tensor, mean_shift_now: Tensor, var_shift_now: Tensor, sizes: list[int]
) -> list[CompensationTerms]:
    """Summaries of moved windows and the coefficients of their derivatives, for one layer or
    several at once (the per-channel work of all layers in one chain).

    Args:
        stats: ``(k, 5, C)`` window (rows ``mean, var, mean_shift, var_shift, samples``); the
            windows of several layers concatenated along ``C``.
        mean_shift_now, var_shift_now: ``(k, C)`` first-order terms at the current weights
            (:func:`cbn.functional.statistic_shifts`), concatenated likewise.
        sizes: the channels of each layer, in the order of the concatenation.

    Returns:
        One :class:`CompensationTerms` per layer (without gradients).

    Example::

        >>> stats = torch.zeros(2, 5, 4); stats[:, 4] = 18.0  # two valid entries
        >>> mean_grad, var_grad = torch.randn(1, 2, 27), torch.randn(4, 2, 27)
        >>> shifts = statistic_shifts(StatisticGradients(mean_grad, var_grad), torch.randn(4, 27), None)
        >>> (terms,) = compensation_coefficients(stats, *shifts, [4])
        >>> terms.unclamped.shape
        torch.Size([2, 4])
    """
    summaries = summaries_in_kernel(stats, mean_shift_now, var_shift_now, sizes, coefficients=True)
    if summaries is not None:
        return [CompensationTerms(PastStatistics(*fields[:-1]), fields[-1]) for fields in summaries]
    mean, var, mean_shift, var_shift, samples = stats.unbind(1)
    moved_mean, moved_var = move_to_current_weights(mean, var, mean_shift, var_shift, mean_shift_now, var_shift_now)
    valid = (samples > 0).to(mean.dtype)
    past = pool_past(moved_mean, moved_var, valid)._replace(samples=samples.sum(0))
    delta = mean_shift_now - mean_shift
    # The clamp's gradient is zero where it acts (var' = 0 after the clamp; at exactly zero
    # either side is a valid subgradient).
    unclamped = valid * (moved_var > 0).to(mean.dtype)  # q
    center_weights = valid / past.count.clamp_min(1)  # w
    spread_weights = 2 * (valid * (moved_mean - past.center) - unclamped * delta)  # p
    # (C, 3, k): each channel's coefficients side by side, each layer's channels one block.
    coefficients = torch.stack((center_weights, spread_weights, unclamped)).permute(2, 0, 1).contiguous()
    pieces = zip(zip(*(t.split(sizes) if t is not None else [None] * len(sizes) for t in past)), coefficients.split(sizes))
    return [CompensationTerms(PastStatistics(*layer_past), layer_coefficients) for layer_past, layer_coefficients in pieces]


def window_weight_gradient(
    mean_coefficients: Tensor,
    mean_gradients: Tensor | Sequence[Tensor],
    var_coefficients: Tensor,
    var_gradients: Tensor | Sequence[Tensor],
) -> Tensor:
    """``out[c] = sum_t a[c, t] G_mu[group(c), t] + b[c, t] G_var[c, t]``: one pass over a window.

    Args:
        mean_coefficients, var_coefficients: ``a`` and ``b``, ``(C, k)``.
        mean_gradients: ``G_mu``, ``(groups, k, fan_in)`` or its ``k`` slots ``(groups, fan_in)``;
        var_gradients: ``G_var``, ``(C, k, fan_in)`` or its ``k`` slots ``(C, fan_in)``.

    Returns:
        ``(C, fan_in)`` in the dtype of ``var_gradients``: the C++ kernel
        ``cbn::window_weight_gradient`` where :mod:`cbn.kernels` is active, else ATen products.
    """
    if kernels.active():
        return torch.ops.cbn.window_weight_gradient(mean_coefficients, gradient_slots(mean_gradients),
                                                    var_coefficients, gradient_slots(var_gradients))
    mean_gradients, var_gradients = gradient_window(mean_gradients), gradient_window(var_gradients)
    groups, entries, fan_in = mean_gradients.shape
    channels = var_gradients.shape[0]
    mean_coefficients = mean_coefficients.to(var_gradients.dtype)
    var_coefficients = var_coefficients.to(var_gradients.dtype)
    if groups == 1:
        out = torch.mm(mean_coefficients, mean_gradients[0])
    else:
        out = torch.bmm(mean_coefficients.reshape(groups, channels // groups, entries), mean_gradients)
        out = out.reshape(channels, fan_in)
    if var_gradients.device.type != "cpu":
        return torch.baddbmm(out.unsqueeze(1), var_coefficients.unsqueeze(1), var_gradients).squeeze(1)
    # On the CPU, without a window-sized temporary (a batched product of k values per row is slower).
    for slot, weight in zip(var_gradients.unbind(1), var_coefficients.unbind(1)):
        out.addcmul_(slot, weight.unsqueeze(1))
    return out


def producer_gradients(
    terms: CompensationTerms, grad_center: Tensor, grad_share: Tensor, inv_entries: Tensor,
    weight: Tensor, bias: Tensor | None, needs_weight: bool = True, needs_bias: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dL/dW, dL/db)`` of the producer from ``dL/dc`` and ``dL/d(P/n)`` (``(C,)`` each)::

        dL/dW[c] = sum_tau (g_c w + g_P p)[tau] G_mu[tau] + sum_tau (g_P q)[tau, c] G_var[tau, c]
        dL/db[c] = sum_tau (g_c w + g_P p)[tau],        g_P = dL/dP = dL/d(P/n) / n

    ``weight``, ``bias``: the producer's (for the shape and dtype of their gradients).
    """
    gradients = terms.gradients
    grad_spread = grad_share * inv_entries
    if kernels.active():
        # One call: the coefficients made in the kernel's channel loop.
        # (dL/dW in the weight's shape, not a view: autograd adds the producer's own weight
        # gradient into it in place.)
        rows, grad_bias = torch.ops.cbn.compensation_gradients(
            terms.coefficients, grad_center, grad_spread, gradients.mean_slots, gradients.var_slots,
            list(weight.shape))
    else:
        mean_coefficients = terms.center_weights * grad_center + terms.spread_weights * grad_spread  # (k, C)
        grad_bias = mean_coefficients.sum(0)
        rows = None
        if needs_weight:
            var_coefficients = terms.unclamped * grad_spread
            rows = window_weight_gradient(mean_coefficients.t().contiguous(), gradients.mean_slots,
                                          var_coefficients.t().contiguous(), gradients.var_slots)
    grad_weight = None
    if needs_weight:
        grad_weight = rows if rows.shape == weight.shape else rows.view(weight.shape)
        if grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
    if not needs_bias or bias is None:
        grad_bias = None
    elif grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_weight, grad_bias


class _AttachedPast(torch.autograd.Function):
    """``(c, P/n)`` as functions of the producer's weight and bias (gradients by :func:`producer_gradients`)."""

    @staticmethod
    def forward(ctx, weight, bias, center, spread_share, inv_entries, terms):
        ctx.terms, ctx.weight, ctx.bias = terms, weight.detach(), None if bias is None else bias.detach()
        ctx.save_for_backward(inv_entries)
        # Views, not copies: the same values with this function's gradient.
        return center.view_as(center), spread_share.view_as(spread_share)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_center, grad_share):
        (inv_entries,) = ctx.saved_tensors
        if grad_center is None or grad_share is None:
            zeros = inv_entries.new_zeros(ctx.terms.coefficients.shape[0])
            grad_center = zeros if grad_center is None else grad_center
            grad_share = zeros if grad_share is None else grad_share
        grads = producer_gradients(
            ctx.terms, grad_center, grad_share,
            inv_entries, ctx.weight, ctx.bias, *ctx.needs_input_grad[:2],
        )
        return *grads, None, None, None, None


def attach_to_producer(terms: CompensationTerms, weight: Tensor, bias: Tensor | None) -> PastStatistics:
    """``terms.past`` as a function of the producer's ``weight`` and ``bias``.

    Args:
        terms: from :func:`compensation_coefficients` at these weights, with its ``gradients``.
        weight: the producer's weight as :func:`cbn.functional.statistic_gradients.shift_weight`
            gives it (``C`` rows of ``fan_in`` up to a reshape), carrying gradients.
        bias: the producer's bias, or ``None``.

    Returns:
        The summary with ``attachment = (weight, bias, terms)``; the normalization
        (:func:`cbn.functional.cross_iteration_batch_norm`, :func:`pooled_normalization`) makes
        ``center`` and ``spread_share`` carry the producer's gradients (:func:`apply_attachment`).
    """
    return with_pooling_weights(terms.past)._replace(attachment=(weight, bias, terms))


_NOT_ATTACHED = ((), ())


def attachment_operands(past: PastStatistics) -> tuple:
    """The attachment of ``past`` as the trailing arguments of the C++ ``cbn::pooled_normalization``
    (the window's gradient slots, producer weight and bias, coefficients), which then gives the
    producer its gradients in its own backward: one autograd node per layer instead of
    :func:`apply_attachment`'s two. Two empty slot lists where ``past`` is not attached."""
    if past.attachment is None or past.attachment[0] is None:
        return _NOT_ATTACHED
    weight, bias, terms = past.attachment
    gradients = terms.gradients
    return gradients.mean_slots, gradients.var_slots, weight, bias, terms.coefficients


def apply_attachment(past: PastStatistics) -> PastStatistics:
    """``past`` with its attachment turned into gradients of ``center`` and ``spread_share`` (a small
    autograd function whose backward is one pass over the window)."""
    if past.attachment is None or past.attachment[0] is None:  # (unattached: values only)
        return past._replace(attachment=None)
    weight, bias, terms = past.attachment
    if kernels.active():
        center, spread_share = torch.ops.cbn.attach_past(
            weight, bias, past.center, past.spread_share, past.inv_entries, terms.coefficients,
            terms.gradients.mean_slots, terms.gradients.var_slots)
    else:
        center, spread_share = _AttachedPast.apply(weight, bias, past.center, past.spread_share, past.inv_entries,
                                                   terms)
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
    ``weight`` and ``bias``: :func:`compensation_coefficients` then :func:`attach_to_producer`.

    Args:
        stats: ``(k, 5, C)`` window (rows ``mean, var, mean_shift, var_shift, samples``).
        mean_grad, var_grad: its statistic gradients, ``(groups, k, fan_in)`` and ``(C, k, fan_in)``,
            read by the backward (not modified in between).
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
    (terms,) = compensation_coefficients(stats, mean_shift_now, var_shift_now, [stats.shape[2]])
    return attach_to_producer(terms._replace(gradients=WindowGradients(mean_grad, var_grad)), weight, bias)
