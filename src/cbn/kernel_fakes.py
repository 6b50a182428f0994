"""Fake (meta) implementations of cbn's C++ operators that write state in place.

``torch.ops.cbn.write_entries`` reads and writes host memory directly, so
under ``FakeTensorMode`` (``torch.compile``, ``torch.export``, ``torch.library.opcheck``) it
cannot run: the function here says what it returns without touching data. The CompositeImplicitAutograd
operators (``pooled_normalization``, ``convolution_statistic_gradients``, ``weight_fingerprint``,
``convolution_producer``, ``statistic_shifts_many``, ``window_summary``, ``window_weight_gradient``,
``compensation_gradients``, ``attach_past``, ``mean_patches``, ``depthwise_variance_gradients``,
``instruction_set``) cannot take a fake implementation (torch refuses one for that key);
compiled graphs take cbn's traceable Python form instead (:func:`cbn.kernels.active`).
:mod:`cbn.kernels` imports this module once the operators are loaded.

Example::

    >>> torch.library.opcheck(torch.ops.cbn.write_entries.default, recorded_arguments)
"""

from __future__ import annotations

import torch


@torch.library.register_fake("cbn::write_entries")
def _write_entries(batch_means, batch_vars, mean_shifts, var_shifts, samples, window_stats, slots, running_means,
                   running_vars, batches_tracked, momenta, pooled_means, pooled_vars, window_samples):
    # One "entry was finite" flag per layer, on the host like the statistics it checks.
    return torch.empty(len(batch_means), dtype=torch.bool, device=batch_means[0].device)

