"""The window of a Cross-Iteration BatchNorm layer: its past entries, per call position.

A norm called several times before one backward (a head shared over the levels of a feature
pyramid, two views of a batch) keeps one window per *call position*: the ``p``-th call since the
last backward through the layer, or since its producer's weights changed. Each
:class:`PositionWindow` is a ring of ``window - 1`` slots:

- ``stats`` ``(window - 1, 5, C)``: per slot the rows ``mean``, ``var``, ``mean_shift``,
  ``var_shift`` (the first-order terms at the weights of the time, see
  :func:`cbn.functional.statistic_shifts`) and ``samples`` (values per channel; 0 marks an empty
  slot or one whose batch was not finite);
- ``mean_grad`` ``(groups, window - 1, fan_in)`` and ``var_grad`` ``(C, window - 1, fan_in)``: the
  statistic gradients, allocated once the position's producer is known (``None`` before, and for
  a frozen or absent producer);
- ``signature``: the producer its entries were recorded with (:class:`cbn.producer_call.ProducerCall`);
  a call with another producer empties the position, whose entries that producer cannot move;
- ``recipe``: the position's latest producer call (its weight a parameter: ``recipe_is_live``;
  else that call's values), which moves its entries at a call without autograd record
  (``no_grad``, reentrant checkpointing) and in :meth:`PositionWindow.statistics`.

Under differentiable compensation a summary's backward reads the statistic gradients it was
computed from, in one pass (:class:`cbn.functional.differentiable_compensation.WindowGradients`). The position keeps track of
those summaries (weakly): a new entry's gradients wait (``pending``) while one of them waits for
its backward, and are written at the position's next read; any other write while such a summary
waits goes into fresh tensors (the position replaces its rings by copies and leaves the summary
the ones it was computed from). So every backward reads exactly the entries its forward pooled,
whatever ran in between (two views before one backward, checkpointing).

The window is the layer's own transient state, like BatchNorm's batch statistics: plain tensors,
not buffers, so ``state_dict``, ``DistributedDataParallel``'s buffer broadcast, FSDP, EMA and SWA
copies see exactly BatchNorm's state and never a tensor whose size depends on pairing. This
module owns the layout, allocation, slot pointers and producer of each position, and reads the
entries back (moved and summarized); :mod:`cbn.layers.window_record` writes the entries into the
slots it claims.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import Tensor

from typing import NamedTuple

from .. import kernels
from ..functional.differentiable_compensation import (
    CompensationTerms, WindowGradients, attach_to_producer, backward_has_run, compensation_coefficients, release,
)
from ..functional.statistic_gradients import LinearCall, producer_groups, shift_weight, statistic_shifts_of_layers
from ..functional.window import MEAN, MEAN_SHIFT, SAMPLES, VAR, VAR_SHIFT, PastStatistics, move_to_current_weights
from ..functional.window import pool_window

# Calls of one norm without a backward through it beyond which a further call position is refused.
MAX_POSITIONS = 32
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class SummaryRequest(NamedTuple):
    """What summarizing a position's window with other layers' needs (:mod:`cbn.model_step`):
    windows of one ``key`` (window, dtype, device, differentiable, compensating) are concatenated."""

    key: tuple
    stats: Tensor
    operands: tuple | None  # (mean gradients, variance gradients, weight rows, bias) when compensating
    recipe: object  # the producer call the operands' weight and bias belong to (None: naive)


class PreparedSummary(NamedTuple):
    """A summary computed with other layers' (a ``PastStatistics``, or ``CompensationTerms`` to
    attach at the call) and the producer call it is valid for."""

    summary: object
    recipe: object


def same_call(recipe, computation) -> bool:
    """Whether ``computation`` (this forward's producer call) is ``recipe`` (the call a summary was
    prepared for): the same weight and bias tensors and settings, or both absent (naive)."""
    if recipe is computation:  # (the same call object, or both None)
        return True
    if recipe is None or computation is None:
        return False
    if type(recipe) is not type(computation) or recipe.weight is not computation.weight:
        return False
    if recipe.bias is not computation.bias:
        return False
    return isinstance(recipe, LinearCall) or (
        (recipe.stride, recipe.padding, recipe.dilation, recipe.groups, recipe.transposed, recipe.output_padding)
        == (computation.stride, computation.padding, computation.dilation, computation.groups,
            computation.transposed, computation.output_padding))


class PositionWindow:
    """The ring of one call position (see the module docstring)."""

    def __init__(self, num_features: int, past: int, dtype: torch.dtype, device) -> None:
        self.stats = torch.zeros(past, 5, num_features, dtype=dtype, device=device)
        self._mean_grad: Tensor | None = None  # (groups, past, fan_in)
        self._var_grad: Tensor | None = None  # (C, past, fan_in)
        self.next_slot = 0
        self.signature: tuple | None = None
        # The latest producer call: what moves the entries at a call without autograd record
        # (reentrant checkpointing, no_grad) when its weight is a parameter, and what
        # ``statistics`` moves them to.
        self.recipe = None
        self.recipe_is_live = False  # its weight is a parameter (current), not one call's values
        # Differentiable summaries read in backward, and gradients waiting for them: (slot, mean, var,
        # finite), mean and var None for a slot to clear, finite False where they may hold non-finite values.
        self._readers: list[weakref.ref] = []
        self.pending: list[tuple[int, Tensor | None, Tensor | None, bool]] = []

    @property
    def mean_grad(self) -> Tensor | None:
        """The mean patches ``(groups, window - 1, fan_in)``, pending entries written."""
        self.flush()
        return self._mean_grad

    @property
    def var_grad(self) -> Tensor | None:
        """The variance gradients ``(C, window - 1, fan_in)``, pending entries written."""
        self.flush()
        return self._var_grad

    @property
    def has_gradients(self) -> bool:
        """Whether the position keeps statistic-gradient rings (pending entries need no writing
        to tell)."""
        return self._var_grad is not None

    @property
    def past(self) -> int:
        return self.stats.shape[0]

    def claim_slot(self) -> int:
        """The slot the next entry goes to (the oldest), and advance the ring."""
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.past
        return slot

    def newest_first(self) -> list[int]:
        """Slot indices from the newest entry to the oldest."""
        return [(self.next_slot - offset) % self.past for offset in range(1, self.past + 1)]

    def reader(self) -> WindowGradients:
        """The statistic gradients for a differentiable summary's backward, tracked by this
        position (through the backward state its autograd node holds) until the rings change."""
        self.flush()
        reader = WindowGradients(self._mean_grad, self._var_grad)
        self._readers = [ref for ref in self._readers if ref() is not None]
        self._readers.append(weakref.ref(reader.flag))  # (alive while its state tensor is)
        return reader

    def _reader_states(self) -> list:
        """Backward states (their NumPy flags) of the summaries of the current rings still held by
        an autograd graph."""
        return [state for ref in self._readers if (state := ref()) is not None]

    def _waiting_readers(self) -> list:
        """Backward states of the summaries of the current rings whose backward has not run."""
        return [state for state in self._reader_states() if not backward_has_run(state)]

    def _new_rings(self, mean_grad: Tensor | None, var_grad: Tensor | None) -> None:
        """Replace the rings; summaries of the old ones keep them, untracked (nothing writes them)."""
        self._mean_grad, self._var_grad = mean_grad, var_grad
        self._readers = []

    def _before_writing(self) -> None:
        """Release the summaries whose backward ran (a second one would read the new entries); if
        one still waits for its backward, write from now on into copies of the rings, leaving it
        the tensors it was computed from."""
        states = self._reader_states()
        waiting = False
        for state in states:
            if backward_has_run(state):
                release(state)
            else:
                waiting = True
        self._readers = []
        if waiting:
            self._new_rings(self._mean_grad.clone(), self._var_grad.clone())

    def defer_gradients(self, slot: int, gradients: tuple[Tensor, Tensor] | None, finite: bool) -> bool:
        """Keep a new entry's gradients (``None``: a slot to clear; ``finite``: known to hold no
        NaN or infinity) until the next read when a differentiable summary waits for its backward;
        ``False`` when they can be written now."""
        if not self._waiting_readers():
            self.flush()
            return False
        self.pending.append((slot, *(gradients if gradients is not None else (None, None)), finite))
        return True

    def flush(self) -> None:
        """Write the pending gradients into their slots (non-finite values as zeros)."""
        if self.pending:  # (every read of the rings calls this: most find nothing to write)
            flush_positions([self])

    def write_slot(self, slot: int, stats: Tensor, mean_grad: Tensor, var_grad: Tensor) -> None:
        """Replace one entry and its gradients (a recompute filling in an entry stored without them)."""
        self.flush()
        self._before_writing()
        self.stats[slot] = stats
        self._mean_grad[:, slot] = mean_grad
        self._var_grad[:, slot] = var_grad

    def empty(self, keep: set[int] = frozenset()) -> None:
        """Invalidate every entry but those in the slots ``keep`` (whose gradients are pending)."""
        self.flush()
        self._before_writing()
        kept = {slot: self.stats[slot].clone() for slot in keep}
        self.stats.zero_()
        for grad in (self._mean_grad, self._var_grad):
            if grad is not None:
                grad.zero_()
        for slot, entry in kept.items():
            self.stats[slot] = entry
        if not keep:
            self.next_slot = 0

    def ensure_gradients(self, groups: int, fan_in: int) -> None:
        """Statistic-gradient rings for a producer with ``groups`` weight groups and ``fan_in``
        weights per output channel (made at the position's first compensated call)."""
        shape = (self.stats.shape[2], self.past, fan_in)
        if self._var_grad is None or self._var_grad.shape != shape or self._mean_grad.shape[0] != groups:
            self.pending = []  # entries of another producer layout: emptied anyway
            self._new_rings(self.stats.new_zeros(groups, self.past, fan_in), self.stats.new_zeros(shape))

    def bind(self, call, keep: set[int] = frozenset()):
        """The producer call this position's entries are moved by in the current forward:
        ``call`` (a :class:`cbn.producer_call.ProducerCall`), or for a call without autograd
        record (``None``) the position's latest producer while its parameters are alive. A
        producer other than the one the entries were recorded with empties the position (but
        the slots ``keep``, whose gradients a recompute is filling in)."""
        if call is None:
            return self.live_recipe()
        if call.computation is self.recipe and self.recipe_is_live:
            # The very call object this position was last bound to (a producer the kernel reads
            # reuses it while weight, bias and settings stay; see ``ProducerCall.known``): same
            # signature, rings already made, the weight a parameter.
            return call.computation
        signature = call.signature
        if self.signature != signature:
            if not _same_producer(self.signature, signature):
                self.empty(keep)
            self.signature = signature
        computation = call.computation
        weight = computation.weight
        if call.trainable and (call.input is not None or call.input_deferred):
            # fan_in: the weights per output channel (a transposed convolution's rows included)
            self.ensure_gradients(producer_groups(computation), weight.numel() // self.stats.shape[2])
        # A parameter stays current; an effective weight is kept as this call's values only.
        self.recipe_is_live = any(weight is p for p in call.parameters)
        self.recipe = computation if self.recipe_is_live else dataclasses.replace(computation, weight=weight.detach())
        return computation

    def live_recipe(self):
        """The latest producer call, if its weight is a parameter that still holds its values
        (FSDP frees an unsharded weight's storage after the forward)."""
        recipe = self.recipe
        if recipe is None or not self.recipe_is_live or recipe.weight.untyped_storage().nbytes() == 0:
            return None
        return recipe

    def summary(self, computation, differentiable: bool) -> PastStatistics:
        """The past entries moved to ``computation``'s weights (naive without one) and summarized
        (:func:`cbn.functional.pool_window`); with ``differentiable``, a function of that weight
        and bias (:func:`cbn.functional.attach_to_producer`)."""
        stats = self.stats
        if computation is None:
            with torch.no_grad():
                return pool_window(stats, None, None)
        self.flush()
        if self._var_grad is None:  # entries stored without gradients: only the bias moves them
            bias = computation.bias
            with torch.no_grad():
                if bias is None:
                    return pool_window(stats, None, None)
                mean_now = bias.detach().to(stats.dtype).expand(stats.shape[0], -1)
                return pool_window(stats, mean_now, torch.zeros_like(mean_now))
        weight = shift_weight(computation, computation.weight)
        with torch.no_grad():
            mean_now, var_now = self._shifts_at(computation, weight)
        if not differentiable:
            with torch.no_grad():
                return pool_window(stats, mean_now, var_now)
        (terms,) = compensation_coefficients(stats, mean_now, var_now, [stats.shape[2]])
        terms = terms._replace(gradients=self.reader())
        if not torch.is_grad_enabled():
            # Unattached: a recompute under autograd (reentrant checkpointing) attaches them.
            return terms.past._replace(attachment=(None, None, terms))
        return attach_to_producer(terms, weight, computation.bias)

    def summary_request(self, compensate: bool, differentiable: bool) -> SummaryRequest | None:
        """A :class:`SummaryRequest` for this position, or ``None`` if it cannot be prepared
        ahead (compensating without gradients or without a current producer)."""
        stats = self.stats
        if not compensate:
            return SummaryRequest((self.past, stats.dtype, stats.device, False, False), stats, None, None)
        recipe = self.live_recipe()
        if recipe is None or self._var_grad is None:
            return None
        self.flush()
        operands = (self._mean_grad, self._var_grad, shift_weight(recipe, recipe.weight).detach(),
                    None if recipe.bias is None else recipe.bias.detach())
        return SummaryRequest((self.past, stats.dtype, stats.device, differentiable, True), stats, operands, recipe)

    def attach(self, summary, computation):
        """A prepared summary for this forward: ``CompensationTerms`` attached to the producer's
        weight and bias (unattached without autograd) and to this position's gradients, a
        ``PastStatistics`` as is."""
        if not isinstance(summary, CompensationTerms):
            return summary
        summary = summary._replace(gradients=self.reader())
        if not torch.is_grad_enabled():
            return summary.past._replace(attachment=(None, None, summary))
        return attach_to_producer(summary, shift_weight(computation, computation.weight), computation.bias)

    def _shifts_at(self, computation, weight: Tensor) -> tuple[Tensor, Tensor]:
        operands = (self._mean_grad, self._var_grad, weight.detach(),
                    None if computation.bias is None else computation.bias.detach())
        (mean_now,), (var_now,) = statistic_shifts_of_layers([operands])
        return mean_now, var_now

    @torch.no_grad()
    def statistics(self, compensate: bool = True) -> dict[str, Tensor]:
        """Valid entries, newest first, raw and moved to the latest producer call's weights."""
        self.flush()
        stats = self.stats
        order = [slot for slot in self.newest_first() if float(stats[slot, SAMPLES, 0]) > 0]
        moved_mean, moved_var = stats[:, MEAN], stats[:, VAR]
        computation = self.recipe
        if computation is not None and self._var_grad is not None and compensate:
            mean_now, var_now = self._shifts_at(computation, shift_weight(computation, computation.weight))
            moved_mean, moved_var = move_to_current_weights(stats[:, MEAN], stats[:, VAR], stats[:, MEAN_SHIFT],
                                                            stats[:, VAR_SHIFT], mean_now, var_now)
        return dict(mean=stats[order, MEAN], var=stats[order, VAR], mean_compensated=moved_mean[order],
                    var_compensated=moved_var[order])

    def has_entries(self) -> bool:
        return bool((self.stats[:, 4, 0] > 0).any())

    def apply(self, fn) -> None:
        self.flush()
        for name in ("stats", "_mean_grad", "_var_grad"):
            tensor = getattr(self, name)
            if tensor is not None:
                moved = fn(tensor)
                # Statistics stay in float32 or wider when the layer is cast to half precision.
                setattr(self, name, moved.float() if moved.dtype in _LOW_PRECISION else moved)


def _same_producer(stored: tuple | None, signature: tuple) -> bool:
    """Whether entries recorded with producer ``stored`` can be moved by ``signature``'s: the same
    kind, weight layout and bias, and the same weight parameter where both are parameters (an
    effective weight, e.g. of a pruning added since, has no identity to compare)."""
    if stored is None or stored[:-1] != signature[:-1]:
        return False
    return stored[-1] in ("copied", None) or signature[-1] is None or stored[-1] == signature[-1]


def write_gradient_slots(entries: list[tuple[PositionWindow, int, tuple[Tensor, Tensor] | None]],
                         finite: bool) -> None:
    """New entries' statistic gradients into their positions' slots: ``(position, slot, (mean,
    var))``, or ``None`` for an entry stored without them (its slot cleared). ``finite``: known
    to hold no NaN or infinity (else each write replaces them with zeros). A position where a
    differentiable summary waits for its backward keeps them aside until its next read
    (:meth:`PositionWindow.defer_gradients`); the others are written now, in one copy."""
    _write_into_rings([(position, slot, *(gradients if gradients is not None else (None, None)), finite)
                       for position, slot, gradients in entries
                       if not position.defer_gradients(slot, gradients, finite)])


def flush_positions(positions: list[PositionWindow]) -> None:
    """:meth:`PositionWindow.flush` of many positions, their pending gradients written together (a
    converted model's step, before it summarizes its windows)."""
    writes = []
    for position in positions:
        if position.pending:
            pending, position.pending = position.pending, []
            position._before_writing()
            writes += [(position, *entry) for entry in pending]
    _write_into_rings(writes)


def _write_into_rings(writes: list[tuple[PositionWindow, int, Tensor | None, Tensor | None, bool]]) -> None:
    """``(position, slot, mean, var, finite)``: finite gradients copied in one
    :func:`copy_into_slots` call, absent ones (``None``) as zeros, the others with non-finite
    values replaced by zeros."""
    windows, slots, sources, cleared = [], [], [], []
    for position, slot, mean, var, finite in writes:
        for ring, source in ((position._mean_grad, mean), (position._var_grad, var)):
            if source is None:
                cleared.append(ring.narrow(1, slot, 1))
            elif finite:
                windows.append(ring)
                slots.append(slot)
                sources.append(source)
            else:
                torch.nan_to_num(source, 0.0, 0.0, 0.0, out=ring.narrow(1, slot, 1))
    if cleared:
        torch._foreach_zero_(cleared)
    if windows:
        copy_into_slots(windows, 1, slots, sources)


def copy_into_slots(windows: list[Tensor], dim: int, slots: list[int], entries: list[Tensor]) -> None:
    """``windows[l].narrow(dim, slots[l], 1).copy_(entries[l])`` for every layer ``l``: in one call
    of the C++ kernel where :mod:`cbn.kernels` is active, else one view per layer and one
    ``_foreach_copy_``."""
    if kernels.active():
        torch.ops.cbn.copy_into_slots(windows, dim, slots, entries)
    else:
        torch._foreach_copy_([window.narrow(dim, slot, 1) for window, slot in zip(windows, slots)], entries)


class CrossIterationWindow:
    """A layer's call positions and their windows.

    Args:
        num_features: ``C``.
        window: entries pooled, the current one included (``window - 1`` slots per position).
        dtype, device: of the statistics (float32 or wider).
    """

    def __init__(self, num_features: int, window: int, dtype: torch.dtype, device=None) -> None:
        self.num_features = num_features
        self.window = window
        self._dtype, self._device = dtype, device
        self.positions: list[PositionWindow] = [PositionWindow(num_features, window - 1, dtype, device)]
        self.next_position = 0

    def position(self, index: int) -> PositionWindow:
        """The window of call position ``index``, made on first use."""
        while index >= len(self.positions):
            if len(self.positions) >= MAX_POSITIONS:
                raise ValueError(
                    f"a norm was called {MAX_POSITIONS + 1} times without a backward through it and with "
                    "unchanged producer weights; each call position keeps its own window. Give each input "
                    "its own norm layer, or call model.eval() for passes that do not train."
                )
            stats = self.positions[0].stats
            self.positions.append(PositionWindow(self.num_features, self.window - 1, stats.dtype, stats.device))
        return self.positions[index]

    def take_position(self, advance: bool) -> int:
        """The call position of the current call; the next call takes the following one when
        ``advance`` (a call that will be followed by a backward)."""
        index = self.next_position
        if advance:
            self.next_position = index + 1
        return index

    def restart_positions(self, *args) -> None:
        """The next call is position 0 again (a backward ran through the layer, or the weights
        changed). Also a tensor hook: ``args`` is the gradient, returned unchanged."""
        self.next_position = 0

    def empty(self) -> None:
        for position in self.positions:
            position.empty()
            position.signature = None
            position.recipe = None
        self.next_position = 0

    def apply(self, fn) -> None:
        for position in self.positions:
            position.apply(fn)

    def nbytes(self) -> int:
        """Bytes held by the entries and statistic gradients of every call position."""
        return sum(t.numel() * t.element_size() for p in self.positions
                   for t in (p.stats, p._mean_grad, p._var_grad, *(g for entry in p.pending for g in entry[1:3]))
                   if isinstance(t, Tensor))

    def state_dict(self) -> dict:
        """The window's entries, for an exact resume (:func:`cbn.window_state_dict`)."""
        for position in self.positions:
            position.flush()
        return {"window": self.window, "positions": [
            {"stats": p.stats, "mean_grad": p._mean_grad, "var_grad": p._var_grad, "next_slot": p.next_slot,
             "signature": None if p.signature is None else (*p.signature[:-1], "copied")}
            for p in self.positions]}

    def load_state_dict(self, state: dict) -> None:
        """Take the entries of :meth:`state_dict` (copied onto this window's device)."""
        if state["window"] != self.window:
            raise ValueError(f"a window state of window={state['window']} cannot be loaded into window={self.window}")
        device = self.positions[0].stats.device
        self.positions = []
        for saved in state["positions"]:
            position = PositionWindow(self.num_features, self.window - 1, saved["stats"].dtype, device)
            position.stats = saved["stats"].to(device=device, copy=True)
            for name in ("mean_grad", "var_grad"):
                tensor = saved[name]
                setattr(position, "_" + name, None if tensor is None else tensor.to(device=device, copy=True))
            position.next_slot = saved["next_slot"]
            position.signature = saved["signature"]
            self.positions.append(position)
        self.next_position = 0

    def __deepcopy__(self, memo):
        # A copy's producer is the copy of this one's: identities are rebound at its first call.
        copy = CrossIterationWindow.__new__(CrossIterationWindow)
        memo[id(self)] = copy
        copy.__dict__.update({key: value for key, value in self.__dict__.items() if key != "positions"})
        copy.positions = []
        for position in self.positions:
            position.flush()
            clone = PositionWindow.__new__(PositionWindow)
            clone.__dict__.update(position.__dict__)
            clone._readers, clone.pending = [], []
            for name in ("stats", "_mean_grad", "_var_grad"):
                tensor = getattr(position, name)
                setattr(clone, name, None if tensor is None else tensor.clone())
            clone.signature = None if position.signature is None else (*position.signature[:-1], "copied")
            clone.recipe = None  # it holds the original's parameters
            copy.positions.append(clone)
        return copy

    def __getstate__(self) -> dict:
        return self.__deepcopy__({}).__dict__
