"""Batch Renormalization (Ioffe, NeurIPS 2017) as plain functions.

Training forward, per channel, over the m values of the batch:

    mu_B    = mean(x)                      sigma_B = sqrt(var_B(x) + eps)   (biased variance)
    sigma   = sqrt(running_var + eps)
    r       = stop_grad(clip(sigma_B / sigma, 1/rmax, rmax))
    d       = stop_grad(clip((mu_B - running_mean) / sigma, -dmax, dmax))
    x_hat   = (x - mu_B) / sigma_B * r + d
    y       = gamma * x_hat + beta

then the running statistics move towards the batch ones, as in BatchNorm
(running_mean += momentum * (mu_B - running_mean), running_var likewise with the unbiased
batch variance). r and d use the running statistics from *before* the update. With
rmax = 1 and dmax = 0 this is exactly BatchNorm. Evaluation is BatchNorm with running statistics.
"""

from __future__ import annotations

from torch import Tensor
import torch


def renorm_limits(
    step: int,
    rmax: float = 3.0,
    dmax: float = 5.0,
    warmup_steps: int = 5000,
    rmax_ramp_steps: int = 40000,
    dmax_ramp_steps: int = 25000,
) -> tuple[float, float]:
    """The usual ramp of the clipping limits at training step ``step`` (0-based).

    BatchNorm (r_max = 1, d_max = 0) for the first ``warmup_steps`` steps, then linear ramps
    to ``rmax`` over ``rmax_ramp_steps`` and to ``dmax`` over ``dmax_ramp_steps`` steps.
    The defaults are the paper's ImageNet schedule.
    """

    def progress(ramp: int) -> float:
        if step < warmup_steps:
            return 0.0
        if ramp <= 0:
            return 1.0
        return min(1.0, (step - warmup_steps) / ramp)

    return 1.0 + (rmax - 1.0) * progress(rmax_ramp_steps), dmax * progress(dmax_ramp_steps)


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> Tensor:
    """Batch Renormalization over the channel dimension 1 (see the module docstring).

    Args:
        input: :math:`(N, C, *)`.
        running_mean, running_var: :math:`(C,)` buffers, updated in place when training;
            ``None`` means no running statistics (then training mode is plain BatchNorm
            and evaluation uses batch statistics too).
        weight, bias: optional affine parameters :math:`(C,)`.
        training: batch statistics plus r/d correction (True) or running statistics (False).
        momentum: weight of the batch statistics in the running-statistics update.
        eps: added to the variance inside the square root.
        rmax, dmax: current clipping limits of r (to [1/rmax, rmax]) and d (to [-dmax, dmax]).
    """
    if input.dim() < 2:
        raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")
    if not training:
        if running_mean is None or running_var is None:
            return torch.nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)

    channels = input.shape[1]
    dims = [0] + list(range(2, input.dim()))
    count = input.numel() // channels
    if count <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got {count}")
    if running_mean is None or running_var is None:
        return torch.nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    # gamma * (x_hat_B * r + d) + beta == batch_norm(x) with weight gamma * r and bias
    # beta + gamma * d: r and d are constants, so this one fused call is exact, gradients included.
    with torch.no_grad():
        var, mean = torch.var_mean(input, dims, correction=0)
        running_std = torch.sqrt(running_var + eps)
        r = (torch.sqrt(var + eps) / running_std).clamp(1.0 / rmax, rmax).to(input.dtype)
        d = ((mean - running_mean) / running_std).clamp(-dmax, dmax).to(input.dtype)
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    if bias is not None:
        shift = shift + bias
    # batch_norm updates the running statistics in place (unbiased variance), after r and d.
    return torch.nn.functional.batch_norm(input, running_mean, running_var, scale, shift, True, momentum, eps)
