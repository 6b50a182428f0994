"""Moving the stored statistics of past iterations to the current weights, and pooling them.

An entry stored at iteration ``t - tau`` holds its mean ``mu``, variance ``var``, and the shifts
``s_mu = d mu/dW . W_old + b_old`` and ``s_var = d var/dW . W_old`` (see ``statistic_gradients.py``).
An entry stored without gradients (its producer input was not available, or its producer is
frozen) has ``s_mu = b_old`` and ``s_var = 0``, the shifts of zero gradients, so that only a
change of the bias moves it.
With the current shifts ``S_mu``, ``S_var`` (same gradients, current weights), the Taylor step of
``docs/method.md`` on ``(mu, nu = var + mu^2)`` reads, exactly::

    delta    = S_mu - s_mu
    mu'      = mu + delta
    var'     = max(var + (S_var - s_var) - delta^2, 0)      <=>  nu' = max(nu', mu'^2)

The ``n - 1`` moved past entries are then summarized by two constants per channel, their centre
``c = mean(mu')`` and spread ``P = sum(var' + (mu' - c)^2)``, from which the pooled statistics of
the current iteration follow in closed form (``normalization.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import kernels


# Rows of a window ``(k, 5, C)``: one entry's statistics, first-order terms and values per channel.
MEAN, VAR, MEAN_SHIFT, VAR_SHIFT, SAMPLES = range(5)


class PastStatistics(NamedTuple):
    """Constants that summarize the valid past entries of a window, per channel.

    ``center``, ``spread`` and ``count`` (entries pooled) have shape ``(C,)``. The others may
    be left out: ``samples``, the values per channel in those entries (for the unbiased running
    variance), and the pooling weights :func:`pooling_weights` derives from ``count`` and
    ``spread``, which :func:`pool_past` computes for all layers at once.
    """

    center: Tensor
    spread: Tensor
    count: Tensor
    samples: Tensor | None = None
    inv_entries: Tensor | None = None  # 1 / n, with n = count + 1 entries pooled in all
    spread_share: Tensor | None = None  # spread / n
    delta_weight: Tensor | None = None  # (n - 1) / n^2
    # (weight, bias, CompensationTerms): differentiable compensation, the summary as a function
    # of the producer's weight and bias (cbn.functional.differentiable_compensation.attach_to_producer).
    attachment: tuple | None = None


def pooling_weights(count: Tensor, spread: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(1/n, spread/n, (n - 1)/n^2)`` with ``n = count + 1``: the constants of the pooled
    statistics ``mu_bar = c + delta / n``, ``var_bar = var / n + P / n + (n - 1)/n^2 delta^2``."""
    inv_entries = (count + 1).reciprocal()
    return inv_entries, spread * inv_entries, count * inv_entries.square()


def with_pooling_weights(past: PastStatistics) -> PastStatistics:
    """``past`` with its pooling weights, derived from ``count`` and ``spread`` where it lacks them."""
    if past.inv_entries is not None:
        return past
    return past._replace(**dict(zip(("inv_entries", "spread_share", "delta_weight"),
                                    pooling_weights(past.count, past.spread))))


def move_to_current_weights(
    mean: Tensor,
    var: Tensor,
    mean_shift_then: Tensor,
    var_shift_then: Tensor,
    mean_shift_now: Tensor,
    var_shift_now: Tensor,
) -> tuple[Tensor, Tensor]:
    """Taylor-moved ``(mu', var')`` of stored entries, all arguments of shape ``(k, C)``.

    The variance is clamped at zero per entry: a first-order step can overshoot below it.
    """
    delta = mean_shift_now - mean_shift_then
    moved_mean = mean + delta
    moved_var = (var + (var_shift_now - var_shift_then) - delta * delta).clamp_min_(0)
    return moved_mean, moved_var


def pool_past(mean: Tensor, var: Tensor, valid: Tensor) -> PastStatistics:
    """Summarize the entries whose ``valid`` flag (0/1, ``(k, C)`` or ``(k, 1)``) is set.

    Args:
        mean, var: ``(k, C)`` statistics of the past entries, already moved to the current weights.
        valid: mask in the dtype of ``mean``; invalid rows must hold finite values.

    Returns:
        :class:`PastStatistics` with per-channel ``center``, ``spread`` and ``count``.
    """
    count = valid.sum(0).expand(mean.shape[1:])
    center = (valid * mean).sum(0) / count.clamp_min(1)
    spread = (valid * (var + (mean - center).square())).sum(0)
    return PastStatistics(center, spread, count, None, *pooling_weights(count, spread))


def pool_window(stats: Tensor, mean_shift_now: Tensor | None, var_shift_now: Tensor | None) -> PastStatistics:
    """Move a window to the current weights (if shifts are given) and summarize it.

    Args:
        stats: ``(k, 5, C)`` window with rows ``mean, var, mean_shift, var_shift, samples``;
            ``samples = 0`` marks an empty or invalid slot (whose other rows are zero). The
            windows of several layers concatenated along ``C`` are summarized in one call.
        mean_shift_now, var_shift_now: ``(k, C)`` first-order terms at the current weights, or
            ``None`` for uncompensated (naive) averaging.
    """
    summaries = summaries_in_kernel(stats, mean_shift_now, var_shift_now, [stats.shape[2]], coefficients=False)
    if summaries is not None:
        return PastStatistics(*summaries[0])
    mean, var, mean_shift, var_shift, samples = stats.unbind(1)
    if mean_shift_now is not None:
        mean, var = move_to_current_weights(mean, var, mean_shift, var_shift, mean_shift_now, var_shift_now)
    # Invalid slots hold samples = 0, so the plain sum counts the pooled values only.
    return pool_past(mean, var, (samples > 0).to(mean.dtype))._replace(samples=samples.sum(0))


def pool_windows(
    stats: Tensor, mean_shift_now: Tensor | None, var_shift_now: Tensor | None, sizes: list[int]
) -> list[PastStatistics]:
    """:func:`pool_window` of several layers' windows concatenated along ``C`` (``sizes``: the
    channels of each), one summary per layer.

    Example::

        >>> stats = torch.zeros(3, 5, 24); stats[:, SAMPLES] = 8.0
        >>> [past.center.shape for past in pool_windows(stats, None, None, [16, 8])]
        [torch.Size([16]), torch.Size([8])]
    """
    summaries = summaries_in_kernel(stats, mean_shift_now, var_shift_now, sizes, coefficients=False)
    if summaries is not None:
        return [PastStatistics(*fields) for fields in summaries]
    past = pool_window(stats, mean_shift_now, var_shift_now)
    return [PastStatistics(*layer) for layer in zip(*(part.split(sizes) for part in past[:-1]))]


def summaries_in_kernel(stats: Tensor, mean_shift_now: Tensor | None, var_shift_now: Tensor | None,
                        sizes: list[int], coefficients: bool) -> list[list[Tensor]] | None:
    """The C++ kernel ``cbn::window_summary`` on windows concatenated along ``C``: per layer the
    fields of its :class:`PastStatistics` (all but the attachment), then with ``coefficients`` its
    ``(C, 3, k)`` coefficients of differentiable compensation; ``None`` where the kernel does not
    apply (:mod:`cbn.kernels` inactive, statistics not float or double on the CPU, shifts of
    another dtype, or a gradient to record: the kernel has no backward, and the layers summarize
    constants of the step)."""
    operands = (stats,) if mean_shift_now is None else (stats, mean_shift_now, var_shift_now)
    if not (kernels.active() and stats.device.type == "cpu" and stats.dtype in (torch.float32, torch.float64)
            and all(t.dtype == stats.dtype for t in operands)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in operands))):
        return None
    pieces = torch.ops.cbn.window_summary(stats, mean_shift_now, var_shift_now, sizes, coefficients)
    per_layer = len(PastStatistics._fields) - 1 + coefficients
    return [pieces[start:start + per_layer] for start in range(0, len(pieces), per_layer)]
