"""Writing a training step into a layer's window: entries, statistic gradients, running statistics.

A training step of a Cross-Iteration BatchNorm layer leaves a :class:`StepRecord`: its batch
statistics and what the new entry's statistic gradients are computed from. :func:`record_steps`
writes the records of many layers in a few batched operations (the per-channel vectors of all
layers concatenated, the writes through ``torch._foreach_*`` kernels or one C++ call); only what
needs a layer's own tensors stays per layer (the weight-gradient convolution). A layer records
its own step with it, or the model-level step (:mod:`cbn.model_step`) records all layers' after
a converted model's forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import kernels
from .._cache import bounded_get
from ..functional.normalization import PooledStatistics
from ..functional.cross_process import all_reduce_statistic_gradients
from ..functional.statistic_gradients import (
    StatisticGradients,
    gradient_slots,
    producer_statistic_gradients_of_layers,
    shift_weight,
    statistic_shifts_of_layers,
)
from ..functional.window import MEAN_SHIFT, SAMPLES, VAR_SHIFT
from .window_state import PositionWindow, write_gradient_slots


class StepRecord(NamedTuple):
    """What one training forward of a layer leaves to record.

    ``samples`` is the number of values per channel of the batch (a 0-dim tensor when pooled
    over processes); ``window_samples`` those of the pooled past entries ``(C,)``, or ``None``
    when the step did not pool. ``gradient_source`` is ``(computation, producer_input, output)``
    when the entry's statistic gradients are wanted (computed at recording time, pooled over
    ``process_group`` when ``samples`` is a tensor); ``computation`` (the producer call, or
    ``None``) gives the bias of an entry stored without them.
    """

    layer: nn.Module  # the Cross-Iteration BatchNorm layer (its running statistics and momentum)
    window: PositionWindow | None  # where the entry goes; None with window=1
    stats: PooledStatistics
    samples: int | Tensor
    window_samples: Tensor | None
    gradient_source: tuple | None
    computation: object
    process_group: object = None
    ticket: EntryTicket | None = None  # told the slot, for gradients filled in later


class EntryTicket:
    """Where an entry stored without its statistic gradients went, so that the recompute of
    activation checkpointing, which has the producer's input, can fill them in
    (:func:`fill_entry_gradients`)."""

    def __init__(self, window: PositionWindow) -> None:
        self.window = window
        self.slot: int | None = None


@torch.no_grad()
def record_steps(records: list[StepRecord]) -> None:
    """Write the records of one forward: window entries, statistic gradients, running statistics.

    For each record, in order: the entry ``(mean, var, s_mu, s_var, samples)`` goes into the
    layer's oldest slot with its statistic gradients (``s_mu, s_var``: the first-order terms at
    the weights of the step, see :mod:`cbn.functional.window`), and the running statistics move
    towards the pooled estimate with the variance unbiased over all pooled values. An entry whose statistics or
    gradients are not finite is stored as an empty slot (zeros, ``samples = 0``) and leaves the
    running statistics unchanged, so no buffer ever holds a NaN or an infinity.

    Records of the same layer are written one after the other (each takes the next slot).
    """
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return record_steps(records)
    batch: list[StepRecord] = []
    seen: set[int] = set()
    for record in records:
        if id(record.layer) in seen:
            _record_batch(batch)
            batch, seen = [], set()
        batch.append(record)
        seen.add(id(record.layer))
    _record_batch(batch)


def _record_batch(records: list[StepRecord]) -> None:
    """:func:`record_steps` for records of distinct layers, grouped by statistics dtype and device."""
    groups: dict[tuple, list[StepRecord]] = {}
    for record in records:
        stats = record.stats.batch_mean
        groups.setdefault((stats.dtype, stats.device), []).append(record)
    for members in groups.values():
        _record_group(members)


def _record_group(records: list[StepRecord]) -> None:
    compensating = [_compensating(record) for record in records]
    gradients = _entry_gradients(records)
    if any(compensating):
        mean_shift, var_shift = _entry_shifts(records, gradients, records[0].stats.batch_mean)
    else:  # naive averaging only: every entry's first-order terms are zero
        mean_shift = var_shift = None
    windowed = [i for i, record in enumerate(records) if record.window is not None]
    slots = [records[i].window.claim_slot() for i in windowed]
    for i, slot in zip(windowed, slots):
        if records[i].ticket is not None:
            records[i].ticket.slot = slot
    write = _write_entries_in_one_call if _in_one_call(records) else _write_entries
    finite = write(records, mean_shift, var_shift, windowed, slots)
    if windowed:
        _write_gradient_slots(records, gradients, windowed, slots, finite)


def _compensating(record: StepRecord) -> bool:
    """Whether the record's entry has first-order terms: gradients, or a bias that moves it."""
    return record.window is not None and (record.window.has_gradients
                                          or getattr(record.computation, "bias", None) is not None)


def _write_entries(records, mean_shift, var_shift, windowed, slots) -> Tensor:
    """The records' entries into their window slots and their running statistics, with
    concatenated tensors and foreach kernels; returns the per-record finite flags."""
    layers = [record.layer for record in records]
    sizes = [layer.num_features for layer in layers]
    device = records[0].stats.batch_mean.device
    batch_mean = torch.cat([record.stats.batch_mean for record in records])
    batch_var = torch.cat([record.stats.batch_var for record in records])
    if mean_shift is None:
        mean_shift = var_shift = torch.zeros_like(batch_mean)
    samples = _per_channel(records, [record.samples for record in records], batch_mean)
    entry = torch.stack((batch_mean, batch_var, mean_shift, var_shift, samples))

    # Finite per record: every statistic of its entry. That covers its gradients: every value of
    # them is a factor of a first-order term (s_var[c] sums row c times the weights, s_mu[c] the
    # group's mean patch times row c), and a NaN or an infinity stays non-finite in a product and
    # a sum (inf * 0 is NaN).
    owner = _channel_owner(sizes, device)
    bad = torch.zeros(len(records), dtype=batch_mean.dtype, device=device)
    bad.index_add_(0, owner, (~torch.isfinite(entry).all(0)).to(bad.dtype))
    finite = bad == 0
    finite_channels = finite[owner]
    if windowed:
        pieces = torch.where(finite_channels, entry, 0.0).unsqueeze(0).split(sizes, dim=2)
        torch._foreach_copy_([records[i].window.stats.narrow(0, slot, 1) for i, slot in zip(windowed, slots)],
                             [pieces[i] for i in windowed])
    tracking = [i for i, layer in enumerate(layers) if layer.track_running_stats]
    if tracking:
        _update_running_stats(records, tracking, sizes, finite_channels, samples)
    return finite


def _in_one_call(records: list[StepRecord]) -> bool:
    """Whether :func:`_write_entries_in_one_call` takes these records: the C++ kernels active, CPU
    statistics of one float dtype, host sample counts, running statistics in that dtype."""
    stats = records[0].stats.batch_mean
    if not (kernels.active() and stats.device.type == "cpu" and stats.dtype in (torch.float32, torch.float64)):
        return False
    for record in records:
        if isinstance(record.samples, Tensor) or record.stats.batch_mean.dtype != stats.dtype:
            return False
        layer = record.layer
        if layer.track_running_stats and layer.running_mean.dtype != stats.dtype:
            return False
    return True


def _write_entries_in_one_call(records, mean_shift, var_shift, windowed, slots) -> Tensor:
    """:func:`_write_entries` as one call of the C++ kernel ``cbn::write_entries``: the same values,
    without one Python frame per operation (the per-channel vectors are a few dozen values)."""
    slot_of = dict(zip(windowed, slots))
    window_stats, window_slots, running_means, running_vars, tracked, momenta = [], [], [], [], [], []
    for i, record in enumerate(records):
        layer = record.layer
        window_stats.append(record.window.stats if i in slot_of else None)
        window_slots.append(slot_of.get(i, 0))
        tracking = layer.track_running_stats
        running_means.append(layer.running_mean if tracking else None)
        running_vars.append(layer.running_var if tracking else None)
        tracked.append(layer.num_batches_tracked if tracking else None)
        momenta.append(-1.0 if layer.momentum is None else float(layer.momentum))
    return torch.ops.cbn.write_entries(
        [record.stats.batch_mean for record in records], [record.stats.batch_var for record in records],
        mean_shift, var_shift, [record.samples for record in records], window_stats, window_slots,
        running_means, running_vars, tracked, momenta,
        [record.stats.mean for record in records], [record.stats.var for record in records],
        [record.window_samples for record in records],
    )


def _entry_gradients(records: list[StepRecord]) -> list:
    """Statistic gradients ``(mean patches, variance gradients)`` of the records' entries (``None``
    where not wanted), the convolutions of all layers in one
    :func:`producer_statistic_gradients_of_layers` call."""
    operands = [_gradient_operands(record) for record in records]
    wanted = [i for i, operand in enumerate(operands) if operand is not None]
    computed = producer_statistic_gradients_of_layers([operands[i] for i in wanted])
    gradients = [None] * len(records)
    for i, entry_gradients in zip(wanted, computed):
        record = records[i]
        if isinstance(record.samples, Tensor):
            # Pooled over processes: the record's mean is the global mean, ``samples`` the global
            # count; each rank's gradients, centred on it, are pooled over the ranks.
            local_samples = record.gradient_source[2].numel() // record.stats.batch_mean.numel()
            entry_gradients = all_reduce_statistic_gradients(entry_gradients, local_samples, record.samples,
                                                             record.process_group)
        gradients[i] = _entry_slot(entry_gradients)
    return gradients


def _entry_slot(gradients: StatisticGradients) -> tuple[Tensor, Tensor]:
    """One entry's gradients as the tensors its slot keeps: the mean patches ``(groups, fan_in)``
    and the variance gradients ``(C, fan_in)``."""
    (mean,), (var,) = gradient_slots(gradients.mean), gradient_slots(gradients.var)
    return mean, var


def _gradient_operands(record: StepRecord) -> tuple | None:
    """The :func:`producer_statistic_gradients` operands of a record, in the statistics dtype."""
    if record.gradient_source is None or record.window is None or not record.window.has_gradients:
        return None
    computation, producer_input, output = record.gradient_source
    dtype = record.window.stats.dtype
    producer_input = producer_input if producer_input.dtype == dtype else producer_input.to(dtype)
    output = output if output.dtype == dtype else output.to(dtype)
    return computation, producer_input, output, record.stats.batch_mean


def _entry_shifts(records: list[StepRecord], gradients: list, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(s_mu, s_var)`` of the new entries, the first-order terms at the weights of their step,
    concatenated: the products of all entries that have gradients in one
    :func:`statistic_shifts_of_layers` call. (For a producer ``y = W u + b`` they equal
    ``(mean, 2 var)`` in exact arithmetic; the products are taken all the same, so that a Taylor
    step at unchanged weights leaves the entry exactly as stored, in float32 and under autocast.)
    Without gradients: ``(b, 0)``, the terms of zero gradients, so that only a change of the bias
    moves the entry."""
    with_gradients = [i for i, g in enumerate(gradients) if g is not None]
    products = None
    if with_gradients:
        products = statistic_shifts_of_layers([_entry_operands(records[i], gradients[i]) for i in with_gradients])
        if len(with_gradients) == len(records):  # (the common case: already side by side)
            return products[0][0], products[1][0]
    sizes = [records[i].stats.batch_mean.numel() for i in with_gradients]
    computed = dict(zip(with_gradients, zip(*(t[0].split(sizes) for t in products)))) if products else {}
    zeros = like.new_zeros(max(record.stats.batch_mean.numel() for record in records))
    mean_pieces, var_pieces = [], []
    for i, record in enumerate(records):
        mean_shift, var_shift = computed[i] if i in computed else _shifts_without_gradients(record, zeros)
        mean_pieces.append(mean_shift)
        var_pieces.append(var_shift)
    return torch.cat(mean_pieces), torch.cat(var_pieces)


def _entry_operands(record: StepRecord, gradients) -> tuple:
    """The :func:`statistic_shifts_of_layers` operands of a new entry: its gradients (one slot),
    the weights of its step."""
    computation = record.gradient_source[0]  # called under no_grad: no detach needed
    mean, var = gradients
    return (mean,), (var,), shift_weight(computation, computation.weight), computation.bias


def _shifts_without_gradients(record: StepRecord, zeros: Tensor) -> tuple[Tensor, Tensor]:
    none = zeros[: record.stats.batch_mean.numel()]
    bias = getattr(record.computation, "bias", None) if record.window is not None else None
    if bias is not None:
        return bias.detach().to(zeros.dtype), none
    return none, none


def _write_gradient_slots(records, gradients, windowed, slots, finite: Tensor) -> None:
    """The new entries' statistic gradients (``None``: stored without them) to their windows
    (:func:`cbn.layers.window_state.write_gradient_slots`, which owns the slots)."""
    entries = [(records[i].window, slot, gradients[i]) for i, slot in zip(windowed, slots)
               if records[i].window.has_gradients]
    if entries:
        # On the CPU the flags cost nothing to read; elsewhere every write replaces non-finite values.
        write_gradient_slots(entries, finite.device.type == "cpu" and bool(finite.all()))


def _update_running_stats(records, tracking, sizes, finite_channels: Tensor, samples: Tensor) -> None:
    """EMA of the pooled estimate, variance unbiased over all pooled values; skipped if not finite."""
    layers = [records[i].layer for i in tracking]
    tracked = [layer.num_batches_tracked for layer in layers]
    torch._foreach_add_(tracked, 1)
    factors = [1.0 / float(count) if layer.momentum is None else layer.momentum for layer, count in zip(layers, tracked)]
    mean = torch.cat([records[i].stats.mean for i in tracking])
    var = torch.cat([records[i].stats.var for i in tracking])
    channels = _select_channels(sizes, tracking, finite_channels.device)
    pooled = samples if channels is None else samples[channels]
    window_samples = [records[i].window_samples for i in tracking]
    if any(w is not None for w in window_samples):
        pooled = pooled + torch.cat([w if w is not None else torch.zeros_like(records[i].stats.mean)
                                     for i, w in zip(tracking, window_samples)])
    unbiased_var = var * (pooled / (pooled - 1))
    weight = finite_channels if channels is None else finite_channels[channels]
    if len(set(factors)) == 1:
        weight = weight.to(mean.dtype).mul_(factors[0])
    else:
        weight = weight.to(mean.dtype).mul_(_per_channel(records, factors, mean, tracking))
    track_sizes = [sizes[i] for i in tracking]
    for running_name, estimate in (("running_mean", mean), ("running_var", unbiased_var)):
        running = [getattr(layer, running_name) for layer in layers]
        pieces = list(estimate.nan_to_num_(0.0, 0.0, 0.0).split(track_sizes))
        weights = list(weight.split(track_sizes))
        if any(r.dtype != p.dtype for r, p in zip(running, pieces)):
            pieces = [p.to(r.dtype) for r, p in zip(running, pieces)]
            weights = [w.to(r.dtype) for r, w in zip(running, weights)]
        torch._foreach_lerp_(running, pieces, weights)


def _per_channel(records, values: list, like: Tensor, which: list[int] | None = None) -> Tensor:
    """One value per record (int, float or 0-dim tensor) repeated over that record's channels."""
    which = range(len(records)) if which is None else which
    sizes = [records[i].layer.num_features for i in which]
    if all(not isinstance(v, Tensor) for v in values):
        return _constant_channels(tuple(sizes), tuple(values), like.dtype, like.device)
    return torch.cat([
        v.to(like.dtype).expand(size) if isinstance(v, Tensor) else like.new_full((size,), v)
        for v, size in zip(values, sizes)
    ])


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant_channels(sizes: tuple, values: tuple, dtype, device) -> Tensor:
    """Cached ``repeat_interleave(values, sizes)``: sample counts rarely change between steps."""
    def make() -> Tensor:
        return torch.tensor(values, dtype=dtype).repeat_interleave(torch.tensor(sizes)).to(device)

    return bounded_get(_CONSTANTS, (sizes, values, dtype, device), make, 256)


def _channel_owner(sizes: list[int], device) -> Tensor:
    """Index of the record that owns each concatenated channel."""
    return _constant_channels(tuple(sizes), tuple(range(len(sizes))), torch.long, device)


def _select_channels(sizes: list[int], which: list[int], device) -> Tensor | None:
    """Indices of the channels of records ``which`` in the concatenation; ``None`` for all."""
    if len(which) == len(sizes):
        return None
    owner = _channel_owner(sizes, device)
    return torch.isin(owner, torch.tensor(which, device=device)).nonzero().squeeze(1)


@torch.no_grad()
def fill_entry_gradients(ticket: EntryTicket, computation, producer_input: Tensor, output: Tensor,
                         mean: Tensor) -> None:
    """The statistic gradients and first-order terms of an entry stored without them, computed
    at the weights of its step (the recompute runs before the optimizer step). A non-finite
    result empties the slot."""
    window, slot = ticket.window, ticket.slot
    if slot is None or not window.has_gradients or not bool(window.stats[slot, SAMPLES, 0] > 0):
        return
    dtype = window.stats.dtype
    (gradients,) = producer_statistic_gradients_of_layers(
        [(computation, producer_input.to(dtype), output.to(dtype), mean.to(dtype))])
    mean_grad, var_grad = _entry_slot(gradients)
    mean_shift, var_shift = statistic_shifts_of_layers(
        [((mean_grad,), (var_grad,), shift_weight(computation, computation.weight), computation.bias)])
    entry = window.stats[slot].clone()
    entry[MEAN_SHIFT], entry[VAR_SHIFT] = mean_shift[0], var_shift[0]
    if not all(bool(torch.isfinite(t).all()) for t in (entry, mean_grad, var_grad)):
        entry, mean_grad, var_grad = entry.zero_(), torch.zeros_like(mean_grad), torch.zeros_like(var_grad)
    window.write_slot(slot, entry, mean_grad, var_grad)
    ticket.slot = None
