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
- ``recipe``: the position's latest producer call whose weight and bias are parameters, which
  moves its entries at a call without autograd record (``no_grad``, reentrant checkpointing).

The window is the layer's own transient state, like BatchNorm's batch statistics: plain tensors,
not buffers, so ``state_dict``, ``DistributedDataParallel``'s buffer broadcast, FSDP, EMA and SWA
copies see exactly BatchNorm's state and never a tensor whose size depends on pairing. This
module owns the layout, allocation and slot pointers; :mod:`cbn.layers.window_record` writes the
entries into the slots it claims.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Past entries and their statistic gradients kept per layer beyond which a call position is refused.
MAX_POSITIONS = 32
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class PositionWindow:
    """The ring of one call position (see the module docstring)."""

    def __init__(self, num_features: int, past: int, dtype: torch.dtype, device) -> None:
        self.stats = torch.zeros(past, 5, num_features, dtype=dtype, device=device)
        self.mean_grad: Tensor | None = None
        self.var_grad: Tensor | None = None
        self.next_slot = 0
        self.signature: tuple | None = None
        # The latest producer call whose weight and bias are parameters: what moves the entries
        # at a call without autograd record (reentrant checkpointing, no_grad).
        self.recipe = None
        self.recipe_is_live = False  # its weight is a parameter (current), not one call's values

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

    def empty(self, keep: set[int] = frozenset()) -> None:
        """Invalidate every entry but those in the slots ``keep`` (whose gradients are pending)."""
        kept = {slot: self.stats[slot].clone() for slot in keep}
        self.stats.zero_()
        for grad in (self.mean_grad, self.var_grad):
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
        if self.var_grad is None or self.var_grad.shape != shape or self.mean_grad.shape[0] != groups:
            self.mean_grad = self.stats.new_zeros(groups, self.past, fan_in)
            self.var_grad = self.stats.new_zeros(shape)

    def has_entries(self) -> bool:
        return bool((self.stats[:, 4, 0] > 0).any())

    def apply(self, fn) -> None:
        for name in ("stats", "mean_grad", "var_grad"):
            tensor = getattr(self, name)
            if tensor is not None:
                moved = fn(tensor)
                # Statistics stay in float32 or wider when the layer is cast to half precision.
                setattr(self, name, moved.float() if moved.dtype in _LOW_PRECISION else moved)


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
                   for t in (p.stats, p.mean_grad, p.var_grad) if t is not None)

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
            position = self.position(len(self.positions)) if self.positions else None
            if position is None:
                self.positions.append(PositionWindow(self.num_features, self.window - 1, saved["stats"].dtype, device))
                position = self.positions[0]
            position.stats = saved["stats"].to(device=device, copy=True)
            for name in ("mean_grad", "var_grad"):
                tensor = saved[name]
                setattr(position, name, None if tensor is None else tensor.to(device=device, copy=True))
            position.next_slot = saved["next_slot"]
            position.signature = saved["signature"]
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
            for name in ("stats", "mean_grad", "var_grad"):
                tensor = getattr(position, name)
                setattr(clone, name, None if tensor is None else tensor.clone())
            clone.signature = None if position.signature is None else (*position.signature[:-1], "copied")
            clone.recipe = None  # it holds the original's parameters
            copy.positions.append(clone)
        return copy

    def __getstate__(self) -> dict:
        return self.__deepcopy__({}).__dict__
