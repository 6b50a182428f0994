"""Cross-Iteration Batch Normalization for PyTorch.

Drop-in layers (:class:`CrossIterationBatchNorm1d/2d/3d`, :class:`CrossIterationBatchNormAct2d`
for timm's norm + activation), a one-call converter (:func:`convert_model`, :func:`revert_model`)
for any model, registrations in the frameworks people train with (:mod:`cbn.integrations`), and
the paper's baselines (:class:`BatchRenorm2d`, a CPU-capable :class:`SyncBatchNorm2d`, ...).
"""

# The package's one version number: pyproject.toml reads it (setuptools' dynamic version).
__version__ = "0.2.0"

from .convert import convert_model, convert_norms, replace_batchnorm, revert_model
from .iterations import mark_step
from .window_checkpoint import load_window_state_dict, window_state_dict
from .pairing import Pairing, format_pairing_report, pairing_report, pairing_summary
from .layers import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    CrossIterationBatchNormAct,
    CrossIterationBatchNormAct2d,
    CrossIterationBatchNormBase,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
    convert_batchrenorm,
    convert_sync_batchnorm,
)

from .integrations import import_after

# timm's models take cbn's classes themselves (norm_layer=cbn.CrossIterationBatchNorm2d): register
# them in timm's norm + act table whenever timm is imported, before or after cbn.
import_after("timm.layers.create_norm_act", "cbn.integrations.timm")

__all__ = [
    "Pairing",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "CrossIterationBatchNormAct",
    "CrossIterationBatchNormAct2d",
    "CrossIterationBatchNormBase",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNorm3d",
    "convert_batchrenorm",
    "convert_model",
    "convert_norms",
    "convert_sync_batchnorm",
    "format_pairing_report",
    "load_window_state_dict",
    "mark_step",
    "pairing_report",
    "pairing_summary",
    "replace_batchnorm",
    "revert_model",
    "window_state_dict",
]
