"""What counts as a training iteration: a change of the weights a producer uses.

``docs/method.md`` defines an iteration as a change of the weights a producer uses between two of
its training forwards. :class:`IterationCounter` counts exactly that, per layer, from what each
training forward really used: a fingerprint of the producer's weight and bias
(:func:`cbn.producer_call.producer_fingerprint`, their dot product with a fixed pseudo-random
vector, equal for unchanged values and different for any update). It needs no optimizer hook, no
version counter and no global state, so every way weights change counts (any optimizer, writes
through ``.data``, ``load_state_dict(assign=True)``, FSDP's resharded parameters), each layer
counts on its own (two models in two threads do not share counters), and several forwards at
unchanged weights (gradient accumulation, a step ``GradScaler`` skipped) are one iteration. A
layer without a producer, or with a frozen one, counts each training forward.

A norm fed by several producers in one forward (one norm on two convolutions' outputs) counts one
iteration per step: the first producer whose weights changed opens it, the others join it until
one of them changes again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn


def in_backward_recompute() -> bool:
    """Whether the caller runs inside a backward pass: activation checkpointing recomputes its
    forward there (either ``use_reentrant``). Such a forward repeats a step; it is no new one."""
    return torch._C._current_graph_task_id() != -1


class IterationDecision(NamedTuple):
    """What a training forward would change in an :class:`IterationCounter` (see ``decide``)."""

    new_iteration: bool
    key: object
    fingerprint: float | None


class IterationCounter:
    """A layer's iteration count (``count``), from the fingerprints of its producers' weights.

    ``decide`` tells whether a call starts a new iteration without changing anything (so that a
    refused batch changes no state); ``commit`` applies it.
    """

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self._fingerprints: dict[object, float] = {}
        self._joined: set = set()  # producers whose change the current iteration already counts

    def decide(self, key: object, fingerprint: float | None) -> IterationDecision:
        """Whether a call with producer ``key`` at weights ``fingerprint`` (``None``: no
        producer, or a frozen one) starts a new iteration."""
        if fingerprint is None:
            return IterationDecision(True, key, None)
        changed = self._fingerprints.get(key) != fingerprint
        new = changed and (key in self._joined or not self._joined)
        return IterationDecision(new, key, fingerprint if changed else None)

    def commit(self, decision: IterationDecision) -> None:
        if decision.new_iteration:
            self.count += 1
            self._joined = set()
        if decision.fingerprint is not None:
            self._fingerprints[decision.key] = decision.fingerprint
            self._joined.add(decision.key)

    def restart(self, count: int = 0) -> None:
        """Set the count (a loaded state, a reset window); the next call's weights count as new."""
        self.count = count
        self._fingerprints = {}
        self._joined = set()

    def __deepcopy__(self, memo):
        # Producer keys are identities of the original's parameters: a copy starts afresh.
        return IterationCounter(self.count)


def mark_step(model_or_parameters: nn.Module | Iterable[Tensor]) -> None:
    """Kept so that code written for earlier versions runs: iterations are now counted from the
    weights each forward uses, so an update through ``.data`` needs no marking. Does nothing.

    Args:
        model_or_parameters: a model or its parameters (ignored).
    """
