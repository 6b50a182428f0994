"""The model-level step of a converted model: every layer's record written at once after its forward.

A training step of a Cross-Iteration BatchNorm layer writes its window after the normalization:
the new entry, its statistic gradients, the running statistics (:mod:`cbn.layers.window_record`).
They depend only on values fixed for the whole forward, so for the layers of one model they are
written together, in a few batched operations instead of many small ones per layer.
:class:`ModelWindowStep` is the pair of hooks ``convert_model`` puts on the model; the layers find
it through :mod:`cbn._step_context` (they hold no reference to it). It is an optimization only:
a layer outside a converted model records its own step, with the same result.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import _step_context
from .functional.differentiable_compensation import compensation_coefficients
from .functional.statistic_gradients import statistic_shifts_of_layers
from .functional.window import pool_windows
from .iterations import in_backward_recompute
from .layers.cross_iteration_batchnorm import CrossIterationBatchNormBase
from .layers.window_record import StepRecord, record_steps
from .layers.window_state import PreparedSummary


@torch.no_grad()
def prepare_summaries(layers: list[CrossIterationBatchNormBase]) -> None:
    """Summarize the windows of many layers at once, before a training forward.

    The past entries are constants of the step and the producers' weights are known before the
    forward (each layer's latest producer, a parameter). Concatenating the windows of all layers
    along channels turns the per-layer chain of small operations (Taylor step, clamp, masking,
    pooling, the coefficients of differentiable compensation) into one chain for the whole model;
    only the products with each producer's weights remain per layer. A layer uses its summary at
    its first call of the forward if that call's producer is the one it was computed for.
    """
    groups: dict[tuple, list] = {}
    for layer in layers:
        request = layer.request_summary()
        if request is not None:
            groups.setdefault(request.key, []).append((layer, request))
    for key, members in groups.items():
        if len(members) == 1:
            continue  # nothing to batch: the layer computes its own summary
        stats = torch.cat([request.stats for _, request in members], dim=2)
        sizes = [layer.num_features for layer, _ in members]
        if key[-1]:  # compensating
            operands = [request.operands for _, request in members]
            mean_now, var_now = statistic_shifts_of_layers(operands)  # (k, all layers' channels)
            if key[-2]:  # differentiable compensation: the layers attach the summaries at their call
                terms = compensation_coefficients(stats, mean_now, var_now, sizes)
                for (layer, request), layer_terms in zip(members, terms):
                    layer.use_prepared_summary(PreparedSummary(layer_terms, request.recipe))
                continue
            pasts = pool_windows(stats, mean_now, var_now, sizes)
        else:
            pasts = pool_windows(stats, None, None, sizes)
        for (layer, request), past in zip(members, pasts):
            layer.use_prepared_summary(PreparedSummary(past, request.recipe))


class ModelWindowStep:
    """The two hooks of a converted model that batch its layers' records.

    As a forward pre-hook (:meth:`before_forward`): start collecting the layers' records. As a
    forward hook called even when the forward raises (:meth:`after_forward`): write them
    (:func:`~cbn.layers.window_record.record_steps`), as BatchNorm's running statistics are
    updated by the layers a failing forward ran. Under ``torch.compile``, under
    ``torch.inference_mode`` and in a recompute during backward both stand aside.
    """

    def __init__(self, layers: list[CrossIterationBatchNormBase], names: list[str] | None = None) -> None:
        self.layers = layers
        self.names = names or [type(layer).__name__ for layer in layers]
        self.pending: list[StepRecord] | None = None  # collecting while not None
        self.reported = False
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
        for layer in self.layers:  # a new model forward: each norm's next call is its first
            layer.window_state.restart_positions()
        _step_context.enter(self)
        prepare_summaries([layer for layer in self.layers if layer.training])

    def after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._stands_aside():
            return
        _step_context.leave(self)
        trained = bool(self.pending)
        self.flush()
        self.pending = None
        if trained and not self.reported:
            self.reported = True
            self._report_unpaired()

    def _report_unpaired(self) -> None:
        """One warning naming the layers that the first training forward left uncompensated."""
        unpaired = []
        for name, layer in zip(self.names, self.layers):
            compensated, _, reason = layer.pairing_status()
            if not compensated and reason != "no training forward yet" and layer.compensate and layer.window > 1:
                unpaired.append(f"{name} ({reason})")
        if unpaired:
            warnings.warn(f"cbn: {', '.join(unpaired)} average uncompensated statistics (naive cross-iteration "
                          "averaging); cbn.pairing_report(model) lists every norm layer.", stacklevel=3)

    def __getstate__(self) -> dict:
        return {"layers": self.layers, "names": self.names, "pending": None, "reported": self.reported}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._layer_ids = frozenset(map(id, self.layers))  # the copies' layers


def install(model: nn.Module, layers: list[CrossIterationBatchNormBase], names: list[str] | None = None) -> ModelWindowStep:
    """Put a :class:`ModelWindowStep` for ``layers`` (named ``names`` in its warning) on
    ``model``, replacing any earlier one."""
    remove(model)
    step = ModelWindowStep(layers, names)
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
