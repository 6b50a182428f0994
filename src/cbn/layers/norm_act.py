"""Cross-Iteration BatchNorm followed by dropout and an activation, in one module (timm's norm + act).

timm builds most of its convolutional networks (EfficientNet, MobileNetV3, RegNet, CSPNet, DPN,
MixNet, Inception-v3, TResNet, RepVGG, MobileOne, LCNet, MobileViT, ...) with
``timm.layers.BatchNormAct2d``: a subclass of ``nn.BatchNorm2d`` whose forward applies, after the
normalization, its ``drop`` submodule (identity, or e.g. DropBlock) and then its ``act`` submodule
(any activation, or identity). :func:`cbn.convert_model` replaces it by
:class:`CrossIterationBatchNormAct2d` holding the same ``drop`` and ``act`` modules, and timm's
``SyncBatchNormAct`` (an ``nn.SyncBatchNorm`` with the same two) by
:class:`CrossIterationBatchNormAct`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .cross_iteration_batchnorm import CrossIterationBatchNorm, CrossIterationBatchNorm2d


class _NormThenActivation:
    """Mixin: the normalization of the next class in the MRO, then ``self.drop``, then ``self.act``."""

    def _add_drop_and_act(self, drop: nn.Module | None, act: nn.Module | None) -> None:
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


_DOC = r"""Cross-Iteration BatchNorm, then dropout, then an activation: {base} with timm's norm + act forward.

    .. math::
        y = \mathrm{{act}}\big(\mathrm{{drop}}(\mathrm{{CBN}}(x))\big)

    where CBN is :class:`cbn.{base}` (window, Taylor step, running statistics, eval mode: all
    unchanged) and ``drop``, ``act`` are any modules (``nn.Identity`` when not given), applied in
    training and eval as timm's ``{timm}`` applies them. :func:`cbn.convert_model` builds it from
    a ``{timm}``, with the very ``drop`` and ``act`` modules and the parameters and running
    statistics of the original; :func:`cbn.revert_model` gives back the original class.

    Args:
        num_features, eps, momentum, affine, track_running_stats, window, burnin, compensate,
            device, dtype, bias, process_group, check_shared_use, differentiable_compensation: as
            for :class:`cbn.{base}`.
        drop: applied to the normalized output (keyword only). Default: ``nn.Identity()``
        act: applied after ``drop`` (keyword only). Default: ``nn.Identity()``

    Shape:
        - Input: {shape}
        - Output: same shape as the input (for shape-preserving ``drop`` and ``act``)

    Example::

        >>> layer = cbn.layers.norm_act.{name}(16, window=3, act=nn.SiLU())
        >>> model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 16, 3), layer))
        >>> out = model(torch.randn(2, 3, 8, 8))
"""


class CrossIterationBatchNormAct2d(_NormThenActivation, CrossIterationBatchNorm2d):
    __doc__ = _DOC.format(base="CrossIterationBatchNorm2d", timm="BatchNormAct2d", shape=r":math:`(N, C, H, W)`",
                          name="CrossIterationBatchNormAct2d")

    def __init__(self, num_features: int, *args, drop: nn.Module | None = None, act: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self._add_drop_and_act(drop, act)


class CrossIterationBatchNormAct(_NormThenActivation, CrossIterationBatchNorm):
    __doc__ = _DOC.format(base="CrossIterationBatchNorm", timm="SyncBatchNormAct", shape=r":math:`(N, C, *)`",
                          name="CrossIterationBatchNormAct")

    def __init__(self, num_features: int, *args, drop: nn.Module | None = None, act: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self._add_drop_and_act(drop, act)
