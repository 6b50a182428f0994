"""timm: ``timm.create_model(name, norm_layer=cbn.CrossIterationBatchNorm2d)`` builds CBN layers.

timm's models take their norm as ``norm_layer=``. Plain-BatchNorm models (ResNet, ...) call it
directly; norm + activation models (EfficientNet, MobileNetV2, RegNet, ...) pass it through
``timm.layers.get_norm_act_layer``, which maps a norm class to its norm + act twin by a table keyed
by the lower-cased class name (``batchnorm2d`` -> ``BatchNormAct2d``) and accepts as they are the
classes of a second table. timm has no public way to add to them, so importing this module adds
cbn's entries to both (and to the string tables of ``get_norm_layer`` and ``get_norm_act_layer``):

- ``CrossIterationBatchNorm2d`` -> :class:`cbn.CrossIterationBatchNormAct2d` and
  ``CrossIterationBatchNorm`` -> :class:`cbn.CrossIterationBatchNormAct` (a ``functools.partial``
  keeps its keywords, e.g. ``window``);
- ``CrossIterationBatchNormAct2d`` and ``CrossIterationBatchNormAct`` accepted as norm + act
  layers, with timm's ``act_layer`` passed through;
- the strings ``"cbn"`` and ``"crossiterationbatchnorm2d"`` for both kinds.

``import cbn`` imports this module as soon as timm's table is imported (before or after cbn), since a
user who writes ``norm_layer=cbn.CrossIterationBatchNorm2d`` has no string telling them a
registration is needed. Built this way, the layers pair with their convolutions at the first
training forward of a model converted with :func:`cbn.convert_model` (which keeps them and
installs the model-level step); see ``docs/integrations.md``.

Example::

    >>> model = timm.create_model("efficientnet_b0", norm_layer=functools.partial(cbn.CrossIterationBatchNorm2d, window=4))
    >>> model = cbn.convert_model(model)   # pair and batch the window steps
"""

from __future__ import annotations

import importlib

from ..layers.cross_iteration_batchnorm import CrossIterationBatchNorm, CrossIterationBatchNorm2d
from ..layers.norm_act import CrossIterationBatchNormAct, CrossIterationBatchNormAct2d

# Norm class -> its norm + act twin, keyed as timm keys its own: the lower-cased class name.
NORM_TO_NORM_ACT = {
    CrossIterationBatchNorm2d.__name__.lower(): CrossIterationBatchNormAct2d,
    CrossIterationBatchNorm.__name__.lower(): CrossIterationBatchNormAct,
}
NAMES = ("cbn", "crossiterationbatchnorm2d")


def register() -> None:
    """Add cbn's layers to timm's norm and norm + act tables (idempotent)."""
    norm_act = importlib.import_module("timm.layers.create_norm_act")
    norm_act._NORM_TO_NORM_ACT_MAP.update(NORM_TO_NORM_ACT)
    for layer in NORM_TO_NORM_ACT.values():
        norm_act._NORM_ACT_TYPES.add(layer)
        # timm passes its act_layer only to the classes of this set.
        norm_act._NORM_ACT_REQUIRES_ARG.add(layer)
    for name in NAMES:
        norm_act._NORM_ACT_MAP[name] = CrossIterationBatchNormAct2d
    norm = importlib.import_module("timm.layers.create_norm")
    for name in NAMES:
        norm._NORM_MAP[name] = CrossIterationBatchNorm2d
    norm._NORM_TYPES.add(CrossIterationBatchNorm2d)


register()
