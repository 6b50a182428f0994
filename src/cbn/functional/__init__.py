"""The maths of Cross-Iteration BatchNorm as plain functions, one concept per file."""

from .cross_process import cross_process_batch_norm, cross_process_batch_statistics
from .normalization import cross_iteration_batch_norm, normalize, pooled_statistics
from .statistic_gradients import StatisticGradients, producer_statistic_gradients, statistic_shifts
from .window import PastStatistics, move_to_current_weights, pool_past

__all__ = [
    "PastStatistics",
    "StatisticGradients",
    "cross_iteration_batch_norm",
    "cross_process_batch_norm",
    "cross_process_batch_statistics",
    "move_to_current_weights",
    "normalize",
    "pool_past",
    "pooled_statistics",
    "producer_statistic_gradients",
    "statistic_shifts",
]
