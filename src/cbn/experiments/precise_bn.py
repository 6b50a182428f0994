"""Precise BatchNorm: population statistics recomputed after training, with the weights frozen.

The control of the small-batch study. A BatchNorm network trained at batch 1 or 2 is evaluated
with running statistics that are an exponential moving average of very noisy batch statistics.
If a method's gain over BatchNorm were only better running statistics, recomputing them exactly
would give BatchNorm the same gain. fvcore's ``PreciseBN`` and ``torch.optim.swa_utils.update_bn``
average batch statistics in training mode; here the statistics are those of the *eval-mode*
network itself, the best running statistics a set of weights can have. Layer ``l`` (in execution
order) gets, over ``images``, the exact per-channel mean and unbiased variance of its input when
layers ``1 .. l-1`` already normalize with their recomputed statistics::

    running_mean_l = (1/m) sum_i x_i          running_var_l = (1/(m-1)) sum_i (x_i - running_mean_l)^2

with ``m`` the values per channel over all images and positions. In eval mode an example's output
does not depend on the rest of its batch, so the passes use large batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase


def running_stat_layers(model: nn.Module, example: Tensor) -> list[_NormBase]:
    """The norm layers with running statistics, in the order a forward of ``example`` calls them."""
    called: list[_NormBase] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: called.append(m) if m not in called else None)
        for m in model.modules()
        if isinstance(m, _NormBase) and m.track_running_stats
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return called


class _ChannelMoments:
    """Forward pre-hook summing a norm input's values and squares per channel (float64)."""

    def __init__(self) -> None:
        self.total = self.squares = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
        total, squares = x.sum(1), x.square().sum(1)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total += total
            self.squares += squares
        self.count += x.shape[1]

    def statistics(self) -> tuple[Tensor, Tensor]:
        mean = self.total / self.count
        var = (self.squares - self.count * mean.square()) / max(1, self.count - 1)
        return mean, var.clamp_min(0)


@torch.no_grad()
def recompute_population_statistics(model: nn.Module, images: Tensor, batch_size: int = 500) -> int:
    """Set every running mean and variance of ``model`` to the eval-mode population statistics.

    Args:
        model: a network with BatchNorm-like layers (``_NormBase`` with running statistics).
        images: ``(M, C, H, W)`` training inputs, preprocessed as for evaluation.
        batch_size: images per forward (any size gives the same result in eval mode).

    Returns:
        The number of layers recomputed. The model is left in the mode it was in.

    Example::

        >>> recompute_population_statistics(model, train_images[:2000])
    """
    was_training = model.training
    layers = running_stat_layers(model, images[:1])
    model.eval()
    try:
        for layer in layers:
            moments = _ChannelMoments()
            hook = layer.register_forward_pre_hook(moments)
            try:
                for start in range(0, len(images), batch_size):
                    model(images[start : start + batch_size])
            finally:
                hook.remove()
            mean, var = moments.statistics()
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    finally:
        model.train(was_training)
    return len(layers)
