"""Batch Renormalization layers (Ioffe, NeurIPS 2017), drop-in for nn.BatchNorm1d/2d/3d."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..norm_swap import layer_factory, swap_norms
from .input_rank import Input1d, Input2d, Input3d

from cbn.functional.batch_renorm import batch_renorm, renorm_limits


class _BatchRenorm(_BatchNorm):
    r"""Batch Renormalization.

    Training, per channel c over the batch (and spatial positions):

    .. math::
        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d,\qquad
        r = \mathrm{sg}\Big(\mathrm{clip}_{[1/r_{max},\, r_{max}]}\frac{\sigma_B}{\sigma}\Big),\qquad
        d = \mathrm{sg}\Big(\mathrm{clip}_{[-d_{max},\, d_{max}]}\frac{\mu_B - \mu}{\sigma}\Big)

    with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}` (biased), :math:`\mu, \sigma^2 - \epsilon`
    the running mean and variance, sg = stop-gradient, and :math:`y = \gamma \hat x + \beta`.
    The running statistics are then updated as in BatchNorm. Evaluation uses the running
    statistics, exactly like BatchNorm.

    The limits follow the usual ramp, counted in training steps in the buffer
    ``num_batches_tracked``: plain BatchNorm (r_max = 1, d_max = 0) for ``warmup_steps`` steps,
    then r_max rises linearly to ``rmax`` over ``rmax_ramp_steps`` steps and d_max to ``dmax``
    over ``dmax_ramp_steps`` steps. :attr:`current_limits` gives the values in use.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: running-statistics update factor; ``None`` for a cumulative average.
            Default: 0.1.
        affine: learnable :math:`\gamma, \beta`. Default: True.
        track_running_stats: keep running statistics; without them the layer is plain
            BatchNorm with batch statistics (r = 1, d = 0). Default: True.
        rmax: final upper clip of r (the lower clip is 1/rmax). Default: 3.
        dmax: final clip of \|d\|. Default: 5.
        warmup_steps: steps of plain BatchNorm before the ramps start. Default: 5000.
        rmax_ramp_steps: steps for r_max to go from 1 to ``rmax``. Default: 40000.
        dmax_ramp_steps: steps for d_max to go from 0 to ``dmax``. Default: 25000.
        device, dtype: of the parameters and buffers. Default: torch's defaults.
        bias: with ``affine``, learn :math:`\beta` too (keyword only, as for ``nn.BatchNorm2d``).
            Default: True.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)` (1d), :math:`(N, C, H, W)` (2d),
          :math:`(N, C, D, H, W)` (3d)
        - Output: same shape as the input.

    Example::

        >>> layer = BatchRenorm2d(16, warmup_steps=100, rmax_ramp_steps=1000, dmax_ramp_steps=500)
        >>> out = layer(torch.randn(4, 16, 8, 8))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        rmax_ramp_steps: int = 40000,
        dmax_ramp_steps: int = 25000,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        # ``bias`` is passed on only when False: older torch versions do not know the keyword.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **({} if bias else {"bias": False}))
        if rmax < 1.0 or dmax < 0.0:
            raise ValueError(f"need rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.warmup_steps = int(warmup_steps)
        self.rmax_ramp_steps = int(rmax_ramp_steps)
        self.dmax_ramp_steps = int(dmax_ramp_steps)

    @property
    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) for the next training step."""
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        return renorm_limits(
            step, self.rmax, self.dmax, self.warmup_steps, self.rmax_ramp_steps, self.dmax_ramp_steps
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        training = self.training
        use_running = self.track_running_stats and self.running_mean is not None
        if training and not use_running:
            return batch_renorm(input, None, None, self.weight, self.bias, True, 0.0, self.eps, 1.0, 0.0)
        if not training:
            if use_running:
                return batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return batch_renorm(input, None, None, self.weight, self.bias, False, 0.0, self.eps)
        rmax, dmax = self.current_limits
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return batch_renorm(
            input, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps, rmax, dmax
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, "
            f"rmax_ramp_steps={self.rmax_ramp_steps}, dmax_ramp_steps={self.dmax_ramp_steps}"
        )

    @classmethod
    def convert(cls, model: nn.Module, **kwargs) -> nn.Module:
        """Replace every nn.BatchNorm1d/2d/3d of ``model`` by the matching BatchRenorm layer.

        Same as :func:`convert_batchrenorm`. ``kwargs`` are the ramp options. Returns the root.
        """
        return convert_batchrenorm(model, **kwargs)


class BatchRenorm1d(Input1d, _BatchRenorm):
    __doc__ = _BatchRenorm.__doc__



class BatchRenorm2d(Input2d, _BatchRenorm):
    __doc__ = _BatchRenorm.__doc__



class BatchRenorm3d(Input3d, _BatchRenorm):
    __doc__ = _BatchRenorm.__doc__



def convert_batchrenorm(model: nn.Module, **kwargs) -> nn.Module:
    """Replace each nn.BatchNorm1d/2d/3d by BatchRenorm1d/2d/3d sharing its state; returns the root.

    The new layers take the BatchNorm's ``eps, momentum, affine, track_running_stats``, bias or
    not, device and dtype, and share its parameters and buffers (running statistics and the step
    counter ``num_batches_tracked``, which drives the ramps, carry over). Other ``_BatchNorm``
    kinds (subclasses, ``nn.SyncBatchNorm``) are left as they are and named in one warning;
    existing BatchRenorm layers are kept.

    Args:
        model: any ``nn.Module``.
        **kwargs: ``rmax, dmax, warmup_steps, rmax_ramp_steps, dmax_ramp_steps`` (see
            :class:`BatchRenorm2d`), or constructor arguments to override the copied ones.

    Example::

        >>> model = cbn.convert_batchrenorm(torchvision.models.resnet18(), warmup_steps=100)
    """
    classes = {nn.BatchNorm1d: BatchRenorm1d, nn.BatchNorm2d: BatchRenorm2d, nn.BatchNorm3d: BatchRenorm3d}
    factories = {old: layer_factory(new, **kwargs) for old, new in classes.items()}
    return swap_norms(model, factories, caller="cbn.convert_batchrenorm", keep=(_BatchRenorm,),
                      fix="Only exact nn.BatchNorm1d/2d/3d layers are converted.")
