"""mmcv / mmengine: ``norm_cfg=dict(type="CBN", window=4, burnin=500)`` in OpenMMLab configs.

OpenMMLab models (mmdet, mmseg, mmpretrain, ...) build their norms with
``mmcv.cnn.build_norm_layer(norm_cfg, num_features)``, ``ConvModule(..., norm_cfg=...)`` among
them, looking the ``type`` up in mmengine's ``MODELS`` registry (a scope's own registry falls back
to it). Importing this module registers there:

- ``"CBN"`` and ``"CBN2d"``: :class:`cbn.CrossIterationBatchNorm2d` (mmcv's ``"BN"`` is 2-D too);
- ``"CBN1d"``, ``"CBN3d"``: the 1-D and 3-D layers.

The config's other keys are the layer's arguments (``window``, ``burnin``, ``compensate``,
``differentiable_compensation``, ``momentum``; ``eps`` defaults to 1e-5 and ``requires_grad`` is
handled by mmcv). The layers are ``_BatchNorm``, so mmcv names them ``bn`` and ``ConvModule``
drops its convolution's bias (``bias="auto"``) as for BatchNorm. Then :func:`cbn.convert_model`
on the model pairs them with their convolutions.

mmdet and mmseg backbones default to ``norm_eval=True``, which puts every ``_BatchNorm`` in eval
mode during training: CBN then normalizes with running statistics and never steps its window.
Set ``norm_eval=False`` in the backbone config. Do not set the Runner's ``sync_bn``: it replaces
CBN layers by SyncBatchNorm (the model refuses to train then, see :mod:`cbn.converter_guard`);
pass ``process_group`` to :func:`cbn.convert_model` for cross-process CBN instead.

Example::

    >>> import cbn.integrations.mmcv
    >>> block = ConvModule(3, 16, 3, norm_cfg=dict(type="CBN", window=4, burnin=500))
"""

from __future__ import annotations

from mmengine.registry import MODELS

from ..layers.cross_iteration_batchnorm import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
)

NAMES = {
    "CBN": CrossIterationBatchNorm2d,
    "CBN1d": CrossIterationBatchNorm1d,
    "CBN2d": CrossIterationBatchNorm2d,
    "CBN3d": CrossIterationBatchNorm3d,
}


def register() -> None:
    """Register cbn's layers in mmengine's root ``MODELS`` registry (idempotent)."""
    for name, layer in NAMES.items():
        MODELS.register_module(name, module=layer, force=True)


register()
