"""Cross-process synchronized BatchNorm that also runs on CPU (gloo).

torch.nn.SyncBatchNorm only runs on CUDA. This layer all-reduces, per channel, the sum, the
sum of squares and the count of the input over a torch.distributed process group, so every
process normalizes with the statistics of the union of the per-process batches; the backward
all-reduces the two per-channel sums it needs, so input gradients are those of the
concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..norm_swap import layer_factory, swap_norms
from .input_rank import Input1d, Input2d, Input3d


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = weight * (x - mean) * invstd + bias with mean/var over all processes.

    Backward, with n the global count, x_hat the normalized input and sums over all processes:

        dL/dx = weight * invstd / n * (n * dy - sum(dy) - x_hat * sum(dy * x_hat))

    dL/dweight = sum_local(dy * x_hat), dL/dbias = sum_local(dy): the local share, as in
    torch's SyncBatchNorm (data-parallel training sums/averages parameter gradients).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, group):
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        local_count = input.numel() // channels
        # Accumulate in float64: sum-of-squares statistics lose precision otherwise.
        x64 = input.double()
        stats = torch.cat(
            [x64.sum(dims), (x64 * x64).sum(dims), x64.new_full((1,), float(local_count))]
        )
        if _world(group) > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        total_sum, total_sq, count = stats[:channels], stats[channels : 2 * channels], stats[-1]
        n = float(count.item())
        if n <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(n)}")
        mean64 = total_sum / n
        var64 = (total_sq / n - mean64 * mean64).clamp_min(0.0)
        shape = [1, channels] + [1] * (input.dim() - 2)
        mean = mean64.to(input.dtype)
        invstd = torch.rsqrt(var64 + eps).to(input.dtype)
        x_hat = (input - mean.view(shape)) * invstd.view(shape)
        out = x_hat
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean64.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var64 * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.n = n
        ctx.group = group
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x_hat, invstd, weight = ctx.saved_tensors
        channels = x_hat.shape[1]
        dims = [0] + list(range(2, x_hat.dim()))
        shape = [1, channels] + [1] * (x_hat.dim() - 2)
        local_dy = grad_output.sum(dims)
        local_dy_xhat = (grad_output * x_hat).sum(dims)
        grad_weight = local_dy_xhat.clone() if weight is not None else None
        grad_bias = local_dy.clone() if ctx.has_bias else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([local_dy, local_dy_xhat])
            if _world(ctx.group) > 1:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            sum_dy, sum_dy_xhat = sums[:channels], sums[channels:]
            scale = invstd if weight is None else invstd * weight
            grad_input = (scale / ctx.n).view(shape) * (
                ctx.n * grad_output - sum_dy.view(shape) - x_hat * sum_dy_xhat.view(shape)
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class _SyncBatchNorm(_BatchNorm):
    r"""BatchNorm whose training statistics span all processes of a group (CPU-capable).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    where mean and (biased) variance are taken per channel over the batches of *all* processes
    of ``process_group`` (an all-reduce of per-channel sum, sum of squares and count; gloo or
    any backend). The backward all-reduces per-channel :math:`\sum dy` and
    :math:`\sum dy\,\hat x`, so input gradients equal those of BatchNorm on the concatenated
    batch; parameter gradients are the local share (sum them over processes, as data-parallel
    training does). Running statistics use the global mean and unbiased global variance.
    With a world size of 1 (or no initialized process group) it is exactly BatchNorm.
    Evaluation uses running statistics, without communication.

    Every process must call forward (and backward) on every layer in the same order.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: running-statistics update factor; ``None`` for a cumulative average.
        affine: learnable :math:`\gamma, \beta`. Default: True.
        track_running_stats: keep running statistics. Default: True.
        process_group: the group to synchronize over; ``None`` means the default (WORLD).
        device, dtype: of the parameters and buffers. Default: torch's defaults.
        bias: with ``affine``, learn :math:`\beta` too (keyword only, as for ``nn.BatchNorm2d``).
            Default: True.

    Shape:
        - Input: :math:`(N, C, *)` as for the matching nn.BatchNorm1d/2d/3d.
        - Output: same shape as the input.

    Example::

        >>> # in each of P processes after dist.init_process_group("gloo", ...)
        >>> layer = SyncBatchNorm2d(16)
        >>> out = layer(torch.randn(4, 16, 8, 8))  # statistics over 4 * P images
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        # ``bias`` is passed on only when False: older torch versions do not know the keyword.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **({} if bias else {"bias": False}))
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats or self.running_mean is None
        if not use_batch_stats:
            return nn.functional.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        momentum = 0.0
        running_mean = running_var = None
        if self.training and self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            running_mean, running_var = self.running_mean, self.running_var
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, momentum, self.process_group
        )

    @classmethod
    def convert(cls, model: nn.Module, process_group=None) -> nn.Module:
        """Replace every nn.BatchNorm1d/2d/3d by the matching SyncBatchNorm (shared state)."""
        return convert_sync_batchnorm(model, process_group)


class SyncBatchNorm1d(Input1d, _SyncBatchNorm):
    __doc__ = _SyncBatchNorm.__doc__



class SyncBatchNorm2d(Input2d, _SyncBatchNorm):
    __doc__ = _SyncBatchNorm.__doc__



class SyncBatchNorm3d(Input3d, _SyncBatchNorm):
    __doc__ = _SyncBatchNorm.__doc__



def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace each nn.BatchNorm1d/2d/3d by SyncBatchNorm1d/2d/3d sharing its state; returns the root.

    The new layers take the BatchNorm's ``eps, momentum, affine, track_running_stats``, bias or
    not, device and dtype, and share its parameters and running statistics. Other ``_BatchNorm``
    kinds (subclasses, ``nn.SyncBatchNorm``) are left as they are and named in one warning;
    existing SyncBatchNorm1d/2d/3d layers are kept.

    Args:
        model: any ``nn.Module``.
        process_group: the group to synchronize over; ``None`` means the default (WORLD).

    Example::

        >>> model = cbn.convert_sync_batchnorm(torchvision.models.resnet18())
    """
    classes = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}
    factories = {old: layer_factory(new, process_group=process_group) for old, new in classes.items()}
    return swap_norms(model, factories, caller="cbn.convert_sync_batchnorm", keep=(_SyncBatchNorm,),
                      fix="Only exact nn.BatchNorm1d/2d/3d layers are converted.")
