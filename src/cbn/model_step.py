"""The model-level step of a converted model: every layer's window summarized before the forward
and every layer's step recorded after it, in a few batched operations instead of many small ones.

A training step of a Cross-Iteration BatchNorm layer reads its window before the normalization
(the past entries moved to the current weights and summarized) and writes it afterwards (the new
entry, its statistic gradients, the running statistics: :mod:`cbn.layers.window_record`). Both
depend only on values fixed for the whole forward, so for the layers of one model they are done
together. :class:`ModelWindowStep` is the pair of hooks ``convert_model`` puts on the model; it
talks to the layers through their public methods only, and the layers find it through
:mod:`cbn._step_context` (they hold no reference to it).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _step_context
from .functional.differentiable_compensation import compensation_jacobians
from .functional.statistic_gradients import statistic_shifts_of_layers
from .functional.window import PastStatistics, pool_window
from .iterations import in_backward_recompute
from .layers.cross_iteration_batchnorm import CrossIterationBatchNormBase
from .layers.window_record import StepRecord, record_steps


@torch.no_grad()
def prepare_past_statistics(layers: list[CrossIterationBatchNormBase]) -> None:
    """Summarize the windows of many layers at once, before a training forward.

    The past entries are constants of the step, known as soon as the optimizer has moved the
    weights. Concatenating the windows of all layers along channels turns the per-layer chain of
    small operations (Taylor step, clamp, masking, pooling) into one chain for the whole model;
    only the products with each producer's weights remain per layer. Each layer takes its
    summary at its first call of the forward; other calls compute their own.
    """
    groups: dict[tuple, list] = {}
    for layer in layers:
        request = layer.start_model_forward()
        if request is not None:
            key, stats, operands = request
            groups.setdefault(key, []).append((layer, stats, operands))
    for key, members in groups.items():
        if len(members) == 1:
            continue  # nothing to batch: the layer computes its own summary
        stats = torch.cat([stats for _, stats, _ in members], dim=2)
        if key[-1]:  # compensating
            operands = [operands for _, _, operands in members]
            if any(operand is None for operand in operands):
                continue  # an unpaired layer among them: each computes its own
            mean_now, var_now = statistic_shifts_of_layers(operands)
            if key[-2]:  # differentiable compensation: the layers attach the summaries at their call
                jacobians = compensation_jacobians(stats, torch.cat(mean_now, dim=1), torch.cat(var_now, dim=1),
                                                   [operand[:2] for operand in operands])
                for (layer, _, _), jacobian in zip(members, jacobians):
                    layer.use_prepared_past(jacobian)
                continue
            past = pool_window(stats, torch.cat(mean_now, dim=1), torch.cat(var_now, dim=1))
        else:
            past = pool_window(stats, None, None)
        sizes = [layer.num_features for layer, _, _ in members]
        for (layer, _, _), *summary in zip(members, *(part.split(sizes) if part is not None else [None] * len(sizes)
                                                      for part in past)):
            layer.use_prepared_past(PastStatistics(*summary))


class ModelWindowStep:
    """The two hooks of a converted model that batch its layers' window steps.

    As a forward pre-hook (:meth:`before_forward`): summarize all windows
    (:func:`prepare_past_statistics`) and start collecting the layers' records. As a forward
    hook called even when the forward raises (:meth:`after_forward`): write them
    (:func:`~cbn.layers.window_record.record_steps`), as BatchNorm's running statistics are
    updated by the layers a failing forward ran. Under ``torch.compile``, under
    ``torch.inference_mode`` and in a recompute during backward (activation checkpointing) both
    stand aside: each layer summarizes and records its own step, or records nothing.
    """

    def __init__(self, layers: list[CrossIterationBatchNormBase]) -> None:
        self.layers = layers
        self.pending: list[StepRecord] | None = None  # collecting while not None
        self._layer_ids = frozenset(map(id, layers))

    def collects(self, layer: nn.Module) -> bool:
        """Whether ``layer``'s records go to this step now (the model's forward is running)."""
        return self.pending is not None and id(layer) in self._layer_ids

    def defer(self, record: StepRecord) -> None:
        self.pending.append(record)

    def flush(self) -> None:
        """Write the records collected so far."""
        if self.pending:
            pending, self.pending = self.pending, []
            record_steps(pending)

    @staticmethod
    def _stands_aside() -> bool:
        return torch.compiler.is_compiling() or in_backward_recompute() or torch.is_inference_mode_enabled()

    def before_forward(self, module: nn.Module, args: tuple) -> None:
        if self._stands_aside():
            return
        self.flush()
        self.pending = []
        _step_context.enter(self)
        prepare_past_statistics(self.layers)

    def after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._stands_aside():
            return
        _step_context.leave(self)
        self.flush()
        self.pending = None

    def __getstate__(self) -> dict:
        return {"layers": self.layers, "pending": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._layer_ids = frozenset(map(id, self.layers))  # the copies' layers


def install(model: nn.Module, layers: list[CrossIterationBatchNormBase]) -> ModelWindowStep:
    """Put a :class:`ModelWindowStep` for ``layers`` on ``model`` (replacing any earlier one)."""
    remove(model)
    step = ModelWindowStep(layers)
    model.register_forward_pre_hook(step.before_forward)
    model.register_forward_hook(step.after_forward, always_call=True)
    return step


def remove(model: nn.Module) -> None:
    """Remove the :class:`ModelWindowStep` hooks of ``model``."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), ModelWindowStep):
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
