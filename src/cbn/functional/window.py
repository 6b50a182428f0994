"""Moving the stored statistics of past iterations to the current weights, and pooling them.

An entry stored at iteration ``t - tau`` holds its mean ``mu``, variance ``var``, and the shifts
``s_mu = d mu/dW . W_old + b_old`` and ``s_var = d var/dW . W_old`` (see ``statistic_gradients.py``).
With the current shifts ``S_mu``, ``S_var`` (same gradients, current weights), the Taylor step of
``cbn-math.md`` on ``(mu, nu = var + mu^2)`` reads, exactly::

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


class PastStatistics(NamedTuple):
    """Constants that summarize the valid past entries of a window, per channel.

    ``center`` and ``spread`` have shape ``(C,)``; ``count`` is a 0-dim tensor (entries pooled).
    """

    center: Tensor
    spread: Tensor
    count: Tensor


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
    """Summarize the entries whose ``valid`` flag (``(k,)`` of 0/1) is set.

    Args:
        mean, var: ``(k, C)`` statistics of the past entries, already moved to the current weights.
        valid: ``(k,)`` mask in the dtype of ``mean``; invalid rows must hold finite values.
    """
    count = valid.sum()
    center = (valid @ mean) / count.clamp_min(1)
    spread = valid @ (var + (mean - center).square())
    return PastStatistics(center, spread, count)


def empty_past(channels: int, dtype: torch.dtype, device: torch.device) -> PastStatistics:
    zeros = torch.zeros(channels, dtype=dtype, device=device)
    return PastStatistics(zeros, zeros, torch.zeros((), dtype=dtype, device=device))
