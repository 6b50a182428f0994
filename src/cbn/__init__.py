"""Cross-Iteration Batch Normalization for PyTorch.

Drop-in layers (:class:`CrossIterationBatchNorm1d/2d/3d`) and a one-call converter
(:func:`convert_model`, :func:`revert_model`) for any model.
"""

from .convert import convert_model, replace_batchnorm, revert_model
from .layers import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
)

__version__ = "0.1.0"

__all__ = [
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "convert_model",
    "replace_batchnorm",
    "revert_model",
]
