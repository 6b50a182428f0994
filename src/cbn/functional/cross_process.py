"""Pooling the current batch statistics over processes (SyncBatchNorm's step, made cross-iteration).

With ``P`` processes, rank ``r`` holding ``n_r`` values per channel with mean ``mu_r`` and biased
variance ``var_r``, the statistics of the concatenated batch (``N = sum n_r`` values) follow from
the parallel-variance identity, which never subtracts two large raw moments::

    mu  = (1/N) sum_r n_r mu_r
    var = (1/N) sum_r n_r (var_r + (mu_r - mu)^2)

Two all-reduces of ``C + 1`` and ``C`` numbers compute them; both are differentiable, so every
rank's input receives the gradient of the loss summed over ranks, as with ``nn.SyncBatchNorm``.

The statistic gradients of the window (``statistic_gradients.py``) pool the same way. With the
global mean in place of the local one,
``(2/n_r) sum_i (y_i - mu) u_i = d var_r/dW + 2 (mu_r - mu) d mu_r/dW``, so::

    d mu /dW = sum_r (n_r/N) d mu_r/dW
    d var/dW = sum_r (n_r/N) (2/n_r) sum_{i in r} (y_i - mu) u_i

one all-reduce of the (weight-sized) gradients per layer and step. The pooled entry is the same
on every rank, so every rank keeps the same window.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .normalization import PooledStatistics, pooled_normalization, reduction_dims
from .statistic_gradients import StatisticGradients
from .window import PastStatistics


class _AllReduceSum(torch.autograd.Function):
    """``sum_r x_r`` on every rank; the backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's loss depends on the sum: d(sum_r' L_r')/dx_r = sum_r' dL_r'/d(sum).
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Differentiable sum over the ranks of ``group`` (``None``: the default group)."""
    return _AllReduceSum.apply(tensor, group)


def cross_process_batch_statistics(
    input: Tensor, stats_dtype: torch.dtype, group=None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of the batch concatenated over ranks, differentiably.

    Args:
        input: this rank's ``(N_r, C, *)`` tensor; shapes other than ``C`` may differ across ranks.
        stats_dtype: dtype of the statistics (float32 or wider).
        group: the process group to pool over.

    Returns:
        ``(mean, var, samples)``: ``(C,)``, ``(C,)`` and the 0-dim total count ``N``, in ``stats_dtype``.
    """
    local_var, local_mean = torch.var_mean(input.to(stats_dtype), reduction_dims(input), correction=0)
    local_samples = local_mean.new_full((1,), input.numel() // input.shape[1])
    totals = all_reduce_sum(torch.cat([local_mean * local_samples, local_samples]), group)
    samples = totals[-1].detach()
    mean = totals[:-1] / samples
    spread = all_reduce_sum(local_samples * (local_var + (local_mean - mean).square()), group)
    return mean, spread / samples, samples


def cross_process_batch_norm(
    input: Tensor,
    past: PastStatistics | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    stats_dtype: torch.dtype = torch.float32,
    group=None,
) -> tuple[Tensor, PooledStatistics, Tensor]:
    """:func:`cbn.functional.cross_iteration_batch_norm` with the batch pooled over ``group``'s ranks.

    ``past`` (``None``: no past entry) must be the same on every rank (it is when the windows
    hold pooled entries). The
    current batch, of ``N`` values per channel over all ranks, is one entry of the window::

        mu_bar  = c + (mu - c) / n
        var_bar = (var + P + (n - 1) / n * (mu - c)^2) / n

    with ``(c, P, n - 1)`` the summary of the past entries (``window.pool_past``).

    Returns:
        The normalized tensor, the statistics it used, and ``N`` (a 0-dim tensor).

    Example::

        >>> # in each of P processes, after torch.distributed.init_process_group(...)
        >>> out, stats, samples = cross_process_batch_norm(x, None, gamma, beta, 1e-5)  # SyncBatchNorm
    """
    batch_mean, batch_var, samples = cross_process_batch_statistics(input, stats_dtype, group)
    output, stats = pooled_normalization(input, batch_mean, batch_var, past, weight, bias, eps)
    return output, stats, samples


def all_reduce_statistic_gradients(
    gradients: StatisticGradients, local_samples: int, samples: Tensor, group=None
) -> StatisticGradients:
    """Pool per-rank statistic gradients computed around the global mean (see the module doc).

    Args:
        gradients: this rank's ``producer_statistic_gradients`` with the *global* batch mean.
        local_samples: this rank's values per channel ``n_r``; ``samples``: the total ``N``.
    """
    weight = local_samples / samples
    packed = torch.cat([gradients.mean.flatten(), gradients.var.flatten()]) * weight
    dist.all_reduce(packed, group=group)
    mean, var = packed.split([gradients.mean.numel(), gradients.var.numel()])
    return StatisticGradients(mean.view_as(gradients.mean), var.view_as(gradients.var))
