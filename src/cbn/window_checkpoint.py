"""Saving and restoring the windows of a model's Cross-Iteration BatchNorm layers.

A layer's ``state_dict`` is BatchNorm's plus its iteration count: the window of past entries is
transient state, like BatchNorm's batch statistics, and its size depends on the producer found
at run time, so it stays out of ``state_dict`` (where EMA and SWA copies, DDP and FSDP would meet
it). Loading a ``state_dict`` empties the window, whose entries were taken at other weights. To
resume exactly where a run stopped, save the windows beside it::

    torch.save({"model": model.state_dict(), "windows": cbn.window_state_dict(model),
                "optimizer": optimizer.state_dict()}, path)
    ...
    model.load_state_dict(checkpoint["model"])
    cbn.load_window_state_dict(model, checkpoint["windows"])

Without them, a resumed run pools fewer entries for ``window - 1`` steps.
"""

from __future__ import annotations

from torch import nn

from .layers.cross_iteration_batchnorm import CrossIterationBatchNormBase


def window_state_dict(model: nn.Module) -> dict[str, dict]:
    """The windows of every Cross-Iteration BatchNorm layer of ``model``, by module name.

    Example::

        >>> windows = cbn.window_state_dict(model)
    """
    return {name: layer.window_state_dict() for name, layer in model.named_modules()
            if isinstance(layer, CrossIterationBatchNormBase)}


def load_window_state_dict(model: nn.Module, state: dict[str, dict]) -> None:
    """Restore windows saved by :func:`window_state_dict` (call it after ``load_state_dict``).

    Raises ``KeyError`` naming a layer of ``model`` that ``state`` lacks, before any change.
    """
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, CrossIterationBatchNormBase)}
    missing = sorted(set(layers) - set(state))
    if missing:
        raise KeyError(f"no saved window for the CBN layers {missing}")
    for name, layer in layers.items():
        layer.load_window_state_dict(state[name])
