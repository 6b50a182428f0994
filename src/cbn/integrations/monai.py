"""MONAI: ``norm=("cbn", {"window": 4, "burnin": 500})`` in MONAI's networks.

MONAI's networks (``UNet``, ``SegResNet``, ``DynUNet``, ``BasicUNet``, ...) take their norm as a
name, or a ``(name, arguments)`` pair, resolved by the ``monai.networks.layers.Norm`` factory
for the network's number of spatial dimensions. Importing this module adds the name ``"cbn"``:
:class:`cbn.CrossIterationBatchNorm1d`, ``2d`` or ``3d`` for 1, 2 or 3 spatial dimensions, given
``num_features`` by MONAI and the other arguments from the pair (``window``, ``burnin``,
``compensate``, ``differentiable_compensation``, ``eps``, ``momentum``, ...). Then
:func:`cbn.convert_model` on the network pairs the layers with their convolutions and installs
the model-level step.

Example::

    >>> import cbn.integrations.monai
    >>> net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2),
    ...            norm=("cbn", {"window": 4}))
    >>> net = cbn.convert_model(net)
"""

from __future__ import annotations

from monai.networks.layers.factories import Norm

from ..layers.cross_iteration_batchnorm import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
)

NAME = "cbn"
_BY_DIMENSIONS = (CrossIterationBatchNorm1d, CrossIterationBatchNorm2d, CrossIterationBatchNorm3d)


def cbn_factory(dim: int) -> type:
    """Cross-Iteration BatchNorm for ``dim`` spatial dimensions (1, 2 or 3), as MONAI's ``"batch"``."""
    if dim not in (1, 2, 3):
        raise ValueError(f"cbn: Cross-Iteration BatchNorm exists for 1, 2 or 3 spatial dimensions, got {dim}")
    return _BY_DIMENSIONS[dim - 1]


def register() -> None:
    """Add ``"cbn"`` to MONAI's ``Norm`` factory (idempotent)."""
    if NAME.upper() not in Norm.names:
        Norm.add_factory_callable(NAME, cbn_factory)


register()
