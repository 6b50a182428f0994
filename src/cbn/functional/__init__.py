"""The maths of Cross-Iteration BatchNorm as plain functions, one concept per file."""

from .batch_renorm import batch_renorm, renorm_limits
from .cross_process import cross_process_batch_norm, cross_process_batch_statistics
from .normalization import CrossIterationNorm, PooledStatistics, cross_iteration_batch_norm, pool_with_past
from .statistic_gradients import ConvolutionCall, StatisticGradients, producer_statistic_gradients, statistic_shifts, weight_rows
from .window import PastStatistics, move_to_current_weights, pool_past

__all__ = [
    "ConvolutionCall",
    "batch_renorm",
    "renorm_limits",
    "CrossIterationNorm",
    "PastStatistics",
    "PooledStatistics",
    "StatisticGradients",
    "cross_iteration_batch_norm",
    "cross_process_batch_norm",
    "cross_process_batch_statistics",
    "move_to_current_weights",
    "pool_with_past",
    "pool_past",
    "producer_statistic_gradients",
    "statistic_shifts",
    "weight_rows",
]
