"""Cross-Iteration BatchNorm followed by dropout and an activation, in one module (timm's norm + act).

timm builds most of its convolutional networks (EfficientNet, MobileNetV2, RegNet, CSPNet, DPN,
MixNet, Inception-v3, TResNet, RepVGG, MobileOne, LCNet, MobileViT, ...) with
``timm.layers.BatchNormAct2d``: a subclass of ``nn.BatchNorm2d`` whose forward applies, after the
normalization, its ``drop`` submodule (identity, or e.g. DropBlock) and then its ``act`` submodule
(any activation, or identity). :class:`CrossIterationBatchNormAct2d` is its cross-iteration twin,
with the same constructor, so that timm builds it wherever it would build ``BatchNormAct2d``
(``timm.create_model(name, norm_layer=cbn.CrossIterationBatchNorm2d)``, see
:mod:`cbn.integrations.timm`). :func:`cbn.convert_model` replaces a ``BatchNormAct2d`` by it, keeping
the very ``drop`` and ``act`` modules, and timm's ``SyncBatchNormAct`` (an ``nn.SyncBatchNorm`` with
the same two) by :class:`CrossIterationBatchNormAct`.

timm is not needed to build these layers, except to name the activation by a string
(``act_layer="silu"``), which timm's ``create_act_layer`` resolves.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from .cross_iteration_batchnorm import CrossIterationBatchNorm, CrossIterationBatchNorm2d


def make_activation(
    act_layer: str | Callable[..., nn.Module] | None,
    act_kwargs: dict[str, Any] | None = None,
    inplace: bool | None = True,
    apply_act: bool = True,
) -> nn.Module:
    """The activation module timm's ``BatchNormAct2d`` would make for the same arguments.

    ``nn.Identity()`` when ``apply_act`` is false or ``act_layer`` is ``None``. A class (or any
    callable) is called with ``inplace`` and ``act_kwargs``, and again without ``inplace`` if it
    does not take it (``nn.GELU``); a string is resolved by timm (``"silu"``, ``"hard_swish"``).

    Example::

        >>> make_activation(nn.ReLU)          # ReLU(inplace=True)
        >>> make_activation(nn.GELU, inplace=True)  # GELU(approximate='none')
    """
    if not apply_act or act_layer is None:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    kwargs.setdefault("inplace", inplace)
    if isinstance(act_layer, str):
        try:
            from timm.layers import create_act_layer
        except ImportError as error:  # names of activations are timm's vocabulary
            raise ImportError(f"act_layer={act_layer!r} is a timm activation name: install timm, or pass "
                              "the activation class (e.g. nn.SiLU)") from error
        act = create_act_layer(act_layer, **kwargs)
        return nn.Identity() if act is None else act
    inplace = kwargs.pop("inplace")
    if inplace is None:
        return act_layer(**kwargs)
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:  # an activation without an in-place form (GELU, Sigmoid, ...), as timm retries
        return act_layer(**kwargs)


class _NormThenActivation:
    """Mixin: the normalization of the next class in the MRO, then ``self.drop``, then ``self.act``.

    The constructor takes timm's ``BatchNormAct2d`` arguments in timm's order, then cbn's layer
    options as keywords, so that timm's factories (which pass ``act_layer``, ``apply_act``,
    ``inplace``, ``drop_layer`` by keyword, ``num_features`` first) build it like their own.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: str | Callable[..., nn.Module] | None = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        device=None,
        dtype=None,
        **cbn_options: Any,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **cbn_options)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = make_activation(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


_DOC = r"""Cross-Iteration BatchNorm, then dropout, then an activation: {base} with timm's norm + act forward.

    .. math::
        y = \mathrm{{act}}\big(\mathrm{{drop}}(\mathrm{{CBN}}(x))\big)

    where CBN is :class:`cbn.{base}` (window, Taylor step, running statistics, eval mode: all
    unchanged), ``drop`` is ``drop_layer()`` (``nn.Identity`` when not given) and ``act`` the
    activation made from ``act_layer`` as timm makes it, applied in training and eval as timm's
    ``{timm}`` applies them. The constructor is timm's ``BatchNormAct2d``'s, plus cbn's options as
    keywords, so timm's model factories build it (see :mod:`cbn.integrations.timm`).
    :func:`cbn.convert_model` builds it from a ``{timm}``, with the very ``drop`` and ``act``
    modules and the parameters and running statistics of the original; :func:`cbn.revert_model`
    gives back the original class.

    Args:
        num_features: channels ``C`` of the input.
        eps, momentum, affine, track_running_stats, device, dtype: as for ``nn.BatchNorm2d``.
        apply_act: make the activation (else ``act`` is ``nn.Identity``). Default: ``True``
        act_layer: activation class, callable or timm name (``"silu"``, needs timm); ``None``: no
            activation. Default: ``nn.ReLU``
        act_kwargs: more keyword arguments of ``act_layer``. Default: ``None``
        inplace: passed to ``act_layer`` if it takes it. Default: ``True``
        drop_layer: class (or callable of no argument) making the ``drop`` module, e.g. timm's
            ``DropBlock2d``. Default: ``None`` (``nn.Identity``)
        window, burnin, compensate, differentiable_compensation, bias, process_group,
            check_shared_use: cbn's options, keyword only, as for :class:`cbn.{base}`.

    Shape:
        - Input: {shape}
        - Output: same shape as the input (for shape-preserving ``drop`` and ``act``)

    Example::

        >>> layer = cbn.{name}(16, act_layer=nn.SiLU, window=3)
        >>> model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 16, 3), layer))
        >>> out = model(torch.randn(2, 3, 8, 8))
"""


class CrossIterationBatchNormAct2d(_NormThenActivation, CrossIterationBatchNorm2d):
    __doc__ = _DOC.format(base="CrossIterationBatchNorm2d", timm="BatchNormAct2d", shape=r":math:`(N, C, H, W)`",
                          name="CrossIterationBatchNormAct2d")


class CrossIterationBatchNormAct(_NormThenActivation, CrossIterationBatchNorm):
    __doc__ = _DOC.format(base="CrossIterationBatchNorm", timm="SyncBatchNormAct", shape=r":math:`(N, C, *)`",
                          name="CrossIterationBatchNormAct")
