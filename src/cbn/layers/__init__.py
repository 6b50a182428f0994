"""Norm layers: Cross-Iteration BatchNorm and the paper's baselines."""

from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, convert_batchrenorm
from .cross_iteration_batchnorm import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    CrossIterationBatchNormBase,
)
from .sync_batchnorm import SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, convert_sync_batchnorm

__all__ = [
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
    "convert_sync_batchnorm",
]
