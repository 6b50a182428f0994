"""What counts as a training iteration: a change of a producer's weights, however it was written.

A Cross-Iteration BatchNorm layer starts a new iteration (for burn-in and for the one-input-size
check) when the autograd version counter of its producer's weight or bias changed since its last
training forward. Ordinary in-place updates (``torch.optim`` optimizers, plain, ``foreach`` and
``fused``; ``load_state_dict``; ``p.add_(...)`` under ``no_grad``) bump that counter. Writes through
``.data`` do not: ``.data`` is a view with a version counter of its own. Two mechanisms close that
gap:

- every ``torch.optim.Optimizer`` step (of any subclass, including those that write through
  ``.data``) bumps the version of the producer parameters it holds that have a gradient, through
  a global step post-hook installed when :mod:`cbn` is imported (parameters of layers no CBN
  layer is paired with are left alone). A step that ``GradScaler`` skips never
  calls ``optimizer.step()``, so it is not an iteration, and gradient accumulation (several
  forwards, one step) is one iteration;
- a hand-written update loop outside any optimizer calls :func:`mark_step` after each update.

The step hook (and :func:`mark_step`) also counts the iteration at once, for each paired layer
that ran a training forward since its last count: a forward inside a compiled graph cannot read
version counters, and an eager forward then finds the versions unchanged. (Two optimizers that
step one producer's weight and its bias separately count two iterations in eager mode.)

A loop that does neither is detected: after :data:`SUSPICIOUS_FORWARDS` training forwards with
unchanged versions, a layer compares its producer's weight with a copy taken half-way; if the
values moved without the counter, it warns once with this advice.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

# Training forwards with unchanged producer versions after which a layer checks whether the
# weights nevertheless moved (gradient accumulation rarely spans this many micro-batches).
SUSPICIOUS_FORWARDS = 64

_installed = False
# Parameters of paired producers by id, weakly held (a WeakSet would compare tensors with ==):
# the only ones the step hook marks.
_watched: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# Paired layers, weakly held: the step hook counts their iteration (see the module doc).
_layers: weakref.WeakSet = weakref.WeakSet()


def in_backward_recompute() -> bool:
    """Whether the caller runs inside a backward pass: activation checkpointing recomputes its
    forward there (either ``use_reentrant``). Such a forward repeats a step; it is no new one."""
    return torch._C._current_graph_task_id() != -1


def watch_parameters(parameters: Iterable[Tensor], layer: nn.Module | None = None) -> None:
    """Have every optimizer step mark these parameters (a producer's, when a layer pairs with it)."""
    _watched.update((id(p), p) for p in parameters)
    if layer is not None:
        _layers.add(layer)


def _bump_optimizer_parameters(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _watched:
        return
    stepped = [p for group in optimizer.param_groups for p in group["params"]
               if p.grad is not None and _watched.get(id(p)) is p]
    if stepped:
        increment_version(stepped)
        _count_step()


def _count_step() -> None:
    """Let the paired layers count the iteration now (a compiled forward cannot read versions)."""
    for layer in list(_layers):
        layer.count_weight_update()


def install_optimizer_step_hook() -> None:
    """Make every ``torch.optim`` step visible to the layers' version check (idempotent)."""
    global _installed
    if not _installed:
        register_optimizer_step_post_hook(_bump_optimizer_parameters)
        _installed = True


def mark_step(model_or_parameters: nn.Module | Iterable[Tensor]) -> None:
    """Mark a weight update made outside ``torch.optim`` (e.g. through ``.data``) as an iteration.

    Args:
        model_or_parameters: a model (its parameters are marked) or the updated parameters.

    Example::

        >>> with torch.no_grad():
        ...     for p in model.parameters():
        ...         p.data -= lr * p.grad
        >>> cbn.mark_step(model)
    """
    if isinstance(model_or_parameters, nn.Module):
        model_or_parameters = model_or_parameters.parameters()
    parameters = list(model_or_parameters)
    if parameters:
        increment_version(parameters)
        _count_step()
