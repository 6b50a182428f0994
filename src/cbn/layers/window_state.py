"""The window of a Cross-Iteration BatchNorm layer: its past entries, per call position.

A norm called several times before one backward (a head shared over the levels of a feature
pyramid, two views of a batch) keeps one window per *call position*: the ``p``-th call since the
last backward through the layer, or since its producer's weights changed. Each
:class:`PositionWindow` is a ring of ``window - 1`` slots:

- ``stats`` ``(window - 1, 5, C)``: per slot the rows ``mean``, ``var``, ``mean_shift``,
  ``var_shift`` (the first-order terms at the weights of the time, see
  :func:`cbn.functional.statistic_shifts`) and ``samples`` (values per channel; 0 marks an empty
  slot or one whose batch was not finite);
- ``mean_slots`` and ``var_slots``: per slot the entry's statistic gradients, tensors of their own,
  ``(groups, fan_in)`` and ``(C, fan_in)``, made once the position's producer is known (``None``
  before, and for a frozen or absent producer); an empty slot holds zeros;
- ``signature``: the producer its entries were recorded with (:class:`cbn.producer_call.ProducerCall`);
  a call with another producer empties the position, whose entries that producer cannot move;
- ``recipe``: the position's latest producer call (its weight a parameter: ``recipe_is_live``;
  else that call's values), which moves its entries at a call without autograd record
  (``no_grad``, reentrant checkpointing) and in :meth:`PositionWindow.statistics`.

Under differentiable compensation a summary's backward reads the statistic gradients it was
computed from, in one pass (:class:`cbn.functional.differentiable_compensation.WindowGradients`:
the slots' tensors themselves). The window never writes a slot's tensors: a new entry, a cleared
slot or an emptied position replaces them. So every backward reads exactly the entries its
forward pooled, whatever ran in between (two views before one backward, checkpointing, a later
forward before a retained graph's second backward), with no copy of the window and nothing to
track; a slot's old tensors live as long as a summary that pooled them.

The window is the layer's own transient state, like BatchNorm's batch statistics: plain tensors,
not buffers, so ``state_dict``, ``DistributedDataParallel``'s buffer broadcast, FSDP, EMA and SWA
copies see exactly BatchNorm's state and never a tensor whose size depends on pairing. This
module owns the layout, allocation, slot pointers, gradient slots and producer of each position,
and reads the entries back (moved and summarized); :mod:`cbn.layers.window_record` writes the
entries' statistics into the slots it claims and hands their gradients to
:func:`write_gradient_slots`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from typing import NamedTuple

from ..functional.differentiable_compensation import (
    CompensationTerms, WindowGradients, attach_to_producer, compensation_coefficients,
)
from ..functional.statistic_gradients import (
    LinearCall, gradient_slots, gradient_window, producer_groups, shift_weight, statistic_shifts_of_layers,
)
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
        self.mean_slots: list[Tensor] | None = None  # past tensors (groups, fan_in)
        self.var_slots: list[Tensor] | None = None  # past tensors (C, fan_in)
        self.next_slot = 0
        self.signature: tuple | None = None
        # The latest producer call: what moves the entries at a call without autograd record
        # (reentrant checkpointing, no_grad) when its weight is a parameter, and what
        # ``statistics`` moves them to.
        self.recipe = None
        self.recipe_is_live = False  # its weight is a parameter (current), not one call's values

    @property
    def mean_grad(self) -> Tensor | None:
        """The mean patches as a window ``(groups, window - 1, fan_in)``: a copy of the slots."""
        return None if self.mean_slots is None else gradient_window(self.mean_slots)

    @property
    def var_grad(self) -> Tensor | None:
        """The variance gradients as a window ``(C, window - 1, fan_in)``: a copy of the slots."""
        return None if self.var_slots is None else gradient_window(self.var_slots)

    @property
    def has_gradients(self) -> bool:
        """Whether the position keeps statistic-gradient slots."""
        return self.var_slots is not None

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
        """The statistic gradients for a differentiable summary's backward: the slots' current tensors."""
        return WindowGradients(self.mean_slots, self.var_slots)

    def write_gradients(self, slot: int, mean: Tensor | None, var: Tensor | None, finite: bool) -> None:
        """Replace a slot's gradients with a new entry's tensors, ``(groups, fan_in)`` and
        ``(C, fan_in)`` (kept, not copied), or with zeros (``None``: stored without them).
        ``finite``: known to hold no NaN or infinity (else those become zeros)."""
        if mean is None:
            mean, var = torch.zeros_like(self.mean_slots[slot]), torch.zeros_like(self.var_slots[slot])
        elif not finite:
            mean, var = (torch.nan_to_num(t, 0.0, 0.0, 0.0) for t in (mean, var))
        self.mean_slots[slot], self.var_slots[slot] = mean, var

    def write_slot(self, slot: int, stats: Tensor, mean_grad: Tensor, var_grad: Tensor) -> None:
        """Replace one entry and its gradients (a recompute filling in an entry stored without them)."""
        self.stats[slot] = stats
        self.mean_slots[slot], self.var_slots[slot] = mean_grad, var_grad

    def empty(self, keep: set[int] = frozenset()) -> None:
        """Invalidate every entry but those in the slots ``keep`` (whose gradients a recompute is
        filling in)."""
        kept = {slot: self.stats[slot].clone() for slot in keep}
        self.stats.zero_()
        if self.var_slots is not None:
            self._zero_slots(self.mean_slots[0].shape[0], self.var_slots[0].shape[1])
        for slot, entry in kept.items():
            self.stats[slot] = entry
        if not keep:
            self.next_slot = 0

    def _zero_slots(self, groups: int, fan_in: int) -> None:
        """Every slot's gradients zeros (one tensor each for the mean and the variance: nothing
        writes a slot's tensors)."""
        zeros = self.stats.new_zeros(groups, fan_in), self.stats.new_zeros(self.stats.shape[2], fan_in)
        self.mean_slots, self.var_slots = [zeros[0]] * self.past, [zeros[1]] * self.past

    def ensure_gradients(self, groups: int, fan_in: int) -> None:
        """Statistic-gradient slots for a producer with ``groups`` weight groups and ``fan_in``
        weights per output channel (made at the position's first compensated call)."""
        if (self.var_slots is None or self.var_slots[0].shape[1] != fan_in
                or self.mean_slots[0].shape[0] != groups):
            self._zero_slots(groups, fan_in)

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
            # signature, gradient slots already made, the weight a parameter.
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
        if self.var_slots is None:  # entries stored without gradients: only the bias moves them
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
        if recipe is None or self.var_slots is None:
            return None
        operands = (tuple(self.mean_slots), tuple(self.var_slots), shift_weight(recipe, recipe.weight).detach(),
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
        operands = (self.mean_slots, self.var_slots, weight.detach(),
                    None if computation.bias is None else computation.bias.detach())
        mean_now, var_now = statistic_shifts_of_layers([operands])
        return mean_now, var_now

    @torch.no_grad()
    def statistics(self, compensate: bool = True) -> dict[str, Tensor]:
        """Valid entries, newest first, raw and moved to the latest producer call's weights."""
        stats = self.stats
        order = [slot for slot in self.newest_first() if float(stats[slot, SAMPLES, 0]) > 0]
        moved_mean, moved_var = stats[:, MEAN], stats[:, VAR]
        computation = self.recipe
        if computation is not None and self.var_slots is not None and compensate:
            mean_now, var_now = self._shifts_at(computation, shift_weight(computation, computation.weight))
            moved_mean, moved_var = move_to_current_weights(stats[:, MEAN], stats[:, VAR], stats[:, MEAN_SHIFT],
                                                            stats[:, VAR_SHIFT], mean_now, var_now)
        return dict(mean=stats[order, MEAN], var=stats[order, VAR], mean_compensated=moved_mean[order],
                    var_compensated=moved_var[order])

    def has_entries(self) -> bool:
        return bool((self.stats[:, 4, 0] > 0).any())

    def apply(self, fn) -> None:
        # Statistics stay in float32 or wider when the layer is cast to half precision.
        def moved(tensor: Tensor) -> Tensor:
            tensor = fn(tensor)
            return tensor.float() if tensor.dtype in _LOW_PRECISION else tensor

        self.stats = moved(self.stats)
        if self.var_slots is not None:
            self.mean_slots = [moved(t) for t in self.mean_slots]
            self.var_slots = [moved(t) for t in self.var_slots]


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
    var))`` of shapes ``(groups, fan_in)`` and ``(C, fan_in)``, kept as the slot's tensors, or
    ``None`` for an entry stored without them (its slot cleared). ``finite``: known to hold no NaN
    or infinity (else each write replaces them with zeros)."""
    for position, slot, gradients in entries:
        position.write_gradients(slot, *(gradients if gradients is not None else (None, None)), finite)


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
        """Bytes held by the entries and statistic gradients of every call position (a tensor
        shared by several slots counted once)."""
        tensors = {id(t): t for p in self.positions for t in (p.stats, *(p.mean_slots or ()), *(p.var_slots or ()))}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def state_dict(self) -> dict:
        """The window's entries, for an exact resume (:func:`cbn.window_state_dict`)."""
        return {"window": self.window, "positions": [
            {"stats": p.stats, "mean_grad": p.mean_grad, "var_grad": p.var_grad, "next_slot": p.next_slot,
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
            for name in ("mean", "var"):
                window = saved[name + "_grad"]
                slots = None if window is None else list(gradient_slots(window.to(device=device, copy=True)))
                setattr(position, name + "_slots", slots)
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
            clone = PositionWindow.__new__(PositionWindow)
            clone.__dict__.update(position.__dict__)
            clone.stats = position.stats.clone()
            for name in ("mean_slots", "var_slots"):
                slots = getattr(position, name)
                setattr(clone, name, None if slots is None else [t.clone() for t in slots])
            clone.signature = None if position.signature is None else (*position.signature[:-1], "copied")
            clone.recipe = None  # it holds the original's parameters
            copy.positions.append(clone)
        return copy

    def __getstate__(self) -> dict:
        return self.__deepcopy__({}).__dict__
