"""Cross-Iteration Batch Normalization for PyTorch.

Drop-in layers (:class:`CrossIterationBatchNorm1d/2d/3d`), a one-call converter
(:func:`convert_model`, :func:`revert_model`) for any model, and the paper's baselines
(:class:`BatchRenorm2d`, a CPU-capable :class:`SyncBatchNorm2d`, ...).
"""

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
    CrossIterationBatchNormBase,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
    convert_batchrenorm,
    convert_sync_batchnorm,
)

__version__ = "0.1.0"

__all__ = [
    "Pairing",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
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
