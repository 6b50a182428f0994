"""Which model-level step, if any, is collecting the records of the layers running now.

A converted model's forward pre-hook (:class:`cbn.model_step.ModelWindowStep`) enters its step
here and its forward hook leaves it; a layer asks :func:`collector_for` whether a step of a model
it belongs to is active, and hands its record to that step instead of writing it at once. Layers
hold no reference to the step (no reference cycle, copies stay independent), and the step, above
the layers, is the only one that enters and leaves. One stack per thread (``nn.DataParallel``
runs replicas in threads); nested converted models each enter their own step.
"""

from __future__ import annotations

import threading

_ACTIVE = threading.local()


def _stack() -> list:
    stack = getattr(_ACTIVE, "steps", None)
    if stack is None:
        stack = _ACTIVE.steps = []
    return stack


def enter(step) -> None:
    _stack().append(step)


def leave(step) -> None:
    stack = _stack()
    if step in stack:
        # The innermost entry of ``step`` (a forward that raised may have left inner ones behind).
        del stack[len(stack) - 1 - stack[::-1].index(step):]


def collector_for(layer):
    """The innermost active step that collects ``layer``'s records, or ``None``."""
    stack = getattr(_ACTIVE, "steps", None)
    if stack:
        for step in reversed(stack):
            if step.collects(layer):
                return step
    return None
