"""Cross-Iteration BatchNorm layers (Yao et al., CVPR 2021), drop-in replacements of nn.BatchNorm."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional.cross_process import all_reduce_statistic_gradients, cross_process_batch_norm
from ..functional.differentiable_compensation import CompensationJacobian, attach_to_producer, compensation_jacobians
from ..functional.normalization import cross_iteration_batch_norm, traceable_cross_iteration_batch_norm
from ..functional.statistic_gradients import (
    ConvolutionCall,
    StatisticGradients,
    producer_groups,
    shift_weight,
    statistic_shifts_of_layers,
    weight_rows,
)
from ..functional.window import MEAN as _MEAN, MEAN_SHIFT as _MEAN_SHIFT, SAMPLES as _SAMPLES, VAR as _VAR
from ..functional.window import VAR_SHIFT as _VAR_SHIFT, PastStatistics, move_to_current_weights, pool_window
from ..iterations import SUSPICIOUS_FORWARDS, in_backward_recompute, watch_parameters
from ..producers import CapturingTap, ProducerRegistry, ProducerTap, weight_set_at_call
from .input_rank import Input1d, Input2d, Input3d
from .._step_context import collector_for
from .window_record import StepRecord, record_step_in_graph, record_steps

_UNRESOLVED, _PAIRED, _UNPAIRED = "unresolved", "paired", "unpaired"
_NO_PRODUCER = "input is not the direct output of a convolution or linear layer"
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Host-side state written at every training forward: never a parameter, buffer or submodule, so
# it skips nn.Module.__setattr__ (several microseconds a call, per layer and step).
_HOST_STATE = frozenset({
    "_prepared_past", "_iteration_shape", "_weight_versions", "_iterations", "_unchanged_forwards",
    "_weight_probe", "_next_slot", "_call", "_burnin_over", "_compiled_mode", "_forward_since_count",
    "_kept_pasts", "_call_position", "_extra_slots",
})


class CrossIterationBatchNormBase(_BatchNorm):
    r"""Base of the Cross-Iteration BatchNorm layers; see :class:`CrossIterationBatchNorm2d`.

    A ``torch.nn.modules.batchnorm._BatchNorm``, so that what recognises BatchNorm by that test
    (``torch.optim.swa_utils.update_bn``, ``torch.ao`` and ``fuse_conv_bn_eval`` fusers, weight
    decay filters) recognises these layers; in eval mode they are BatchNorm.

    The window is a ring of ``window - 1`` slots in three buffers, written in place:

    - ``window_stats`` ``(window - 1, 5, C)``: per slot the rows ``mean``, ``var``, ``mean_shift``,
      ``var_shift`` (the first-order terms at the weights of the time, see
      :func:`cbn.functional.statistic_shifts`) and ``samples`` (values per channel; 0 marks an
      empty slot or one whose batch was not finite);
    - ``window_mean_grad`` ``(groups, window - 1, fan_in)`` and ``window_var_grad``
      ``(C, window - 1, fan_in)``: the statistic gradients, allocated once the producer is known
      (for a convolution, ``window_var_grad`` holds ``window - 1`` weight-sized tensors, the only
      large state).
    """

    _version = 2
    # Pooled statistics kept per layer for activation checkpointing's recompute (see
    # ``_recompute_forward``): the latest forwards of the iteration, one per input shape.
    _kept_pasts_limit = 16
    _float_window_buffers = ("window_stats", "window_mean_grad", "window_var_grad")
    _window_buffers = (*_float_window_buffers, "window_next", "num_iterations")
    # Also per rank under DDP, but not saved: the iteration count a compiled forward records.
    _local_buffers = ("iteration_count",)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        window: int = 4,
        burnin: int = 0,
        compensate: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        process_group: dist.ProcessGroup | None = None,
        check_shared_use: bool = True,
        differentiable_compensation: bool | None = None,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1 (1 is BatchNorm), got {window!r}")
        if not isinstance(burnin, int) or burnin < 0:
            raise ValueError(f"burnin must be an integer >= 0, got {burnin!r}")
        if differentiable_compensation is None:
            differentiable_compensation = compensate
        if differentiable_compensation and not compensate:
            raise ValueError("differentiable_compensation=True needs compensate=True: naive averaging "
                             "(compensate=False) has no Taylor terms to differentiate")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.window = window
        self.burnin = burnin
        self.compensate = compensate
        self.process_group = process_group
        self.check_shared_use = check_shared_use
        self.differentiable_compensation = differentiable_compensation
        # Spatial size of this iteration's inputs, per call position.
        self._iteration_shape: dict[int, torch.Size] = {}
        # A norm called several times in one model forward (a head shared over the levels of a
        # feature pyramid) keeps one window per call position: rows p * (window - 1) onwards of
        # the window buffers. The count is set by the first iteration; position 0's slot is
        # ``_next_slot``, the others' ``_extra_slots``.
        self._call_position = 0
        self._positions = 1
        self._positions_fixed = False
        self._extra_slots: list[int] = []
        stats_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        factory = {"device": device, "dtype": stats_dtype}
        self.register_buffer("window_stats", torch.zeros(window - 1, 5, num_features, **factory))
        self.register_buffer("window_mean_grad", torch.zeros(0, **factory))
        self.register_buffer("window_var_grad", torch.zeros(0, **factory))
        self.register_buffer("window_next", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("num_iterations", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("iteration_count", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        # Host-side copies of the two counters, so that the step never waits on the device.
        self._next_slot: int | None = 0  # None after compiled steps: window_next holds it
        self._set_iterations(0)
        self._compiled_mode = False  # has trained inside a compiled graph
        self._forward_since_count = False  # a training forward since the last counted iteration
        self._weight_versions: tuple[int, ...] | None = None
        self._registry: ProducerRegistry | None = None
        self._producer: tuple[nn.Module, ProducerTap] | None = None
        self._producer_parameters: list[Tensor] = []
        self._call: ConvolutionCall | None = None  # the F.convNd call of a custom producer forward
        self._weight_set_at_call = False  # the producer's weight is set by a pre-hook at each call
        self._through_view = False  # the input is a view of the producer's output (see producers.py)
        self._pairing = _UNRESOLVED
        self._unpaired_reason = ""
        self._layer_name = type(self).__name__
        self._warned_mismatch = False
        self._prepared_past: PastStatistics | None = None
        self._unchanged_forwards = 0
        self._weight_probe: Tensor | None = None
        self._warned_unmarked = False
        # (input shape, past statistics) of this iteration's training forwards, newest last.
        self._kept_pasts: list[tuple[torch.Size, PastStatistics | None]] = []

    # ----------------------------------------------------------------------------- state
    def __setattr__(self, name: str, value) -> None:
        if name in _HOST_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def reset_running_stats(self) -> None:
        """Reset the running statistics and empty the window (the iteration count, and so
        burn-in, goes on).

        What ``torch.optim.swa_utils.update_bn`` calls before recomputing the running statistics
        over a data set: the following training forwards then estimate them from that data at
        the current weights only, with no stored entry of older weights.
        """
        super().reset_running_stats()
        if hasattr(self, "window_stats"):  # called from _NormBase.__init__, before the window exists
            self._empty_window()

    def reset_window(self) -> None:
        """Empty the window of past statistics and restart the iteration count (and burn-in)."""
        self._empty_window()
        self.num_iterations.zero_()
        self.iteration_count.zero_()
        self._set_iterations(0)
        self._weight_versions = None

    def _empty_window(self) -> None:
        self.window_stats.zero_()
        self.window_mean_grad.zero_()
        self.window_var_grad.zero_()
        self.window_next.zero_()
        self._next_slot = 0
        self._extra_slots = [0] * (self._positions - 1)
        self._kept_pasts = []

    def _rows(self, position: int) -> slice:
        """The window rows of call position ``position``."""
        past = self.window - 1
        return slice(position * past, (position + 1) * past)

    def _add_call_position(self) -> None:
        """One more window, for a further call of this norm in one model forward."""
        if self._positions_fixed:
            raise ValueError(
                f"{self._layer_name} is called {self._positions + 1} or more times in one model forward, "
                f"but {self._positions} times in the forwards of its first training iteration. Each call "
                "position (e.g. a feature-pyramid level) keeps its own window, so the number of calls "
                "per forward must not grow after the first iteration; give the extra input its own norm "
                "layer."
            )
        past = self.window - 1
        self.window_stats = torch.cat((self.window_stats, self.window_stats.new_zeros(past, *self.window_stats.shape[1:])))
        for name in ("window_mean_grad", "window_var_grad"):
            buffer = getattr(self, name)
            if buffer.dim() == 3:
                setattr(self, name, torch.cat((buffer, buffer.new_zeros(buffer.shape[0], past, buffer.shape[2])), dim=1))
        self._positions += 1
        self._extra_slots.append(0)
        self.window_next = self.window_next.new_zeros(self._positions)
        self.window_next[0] = self._next_slot
        for position, slot in enumerate(self._extra_slots, start=1):
            self.window_next[position] = slot

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        # Statistics stay in float32 or wider when the layer is cast to half precision.
        for name in self._float_window_buffers:
            buffer = getattr(self, name)
            if buffer.dtype in _LOW_PRECISION:
                setattr(self, name, buffer.float())
        return module

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if all(prefix + key not in state_dict for key in self._window_buffers):
            # A plain BatchNorm state: its weights make any stored window stale, start empty.
            self.reset_window()
            for key in self._window_buffers:
                state_dict[prefix + key] = getattr(self, key)
        for key in ("window_stats", "window_mean_grad", "window_var_grad", "window_next"):
            incoming = state_dict.get(prefix + key)
            if incoming is not None and incoming.shape != getattr(self, key).shape:
                setattr(self, key, torch.zeros_like(incoming, dtype=getattr(self, key).dtype))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        slots = self.window_next.view(-1).tolist()
        self._next_slot, self._extra_slots = slots[0], slots[1:]
        self._positions = len(slots)
        self._positions_fixed = self._positions > 1
        self._set_iterations(int(self.num_iterations))
        self.iteration_count.copy_(self.num_iterations)
        self._weight_versions = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A copy (deepcopy, pickle) pairs with the copy of its producer: have optimizer steps
        # mark those parameters too, or an optimizer writing through .data counts no iteration.
        if self._producer_parameters:
            watch_parameters(self._producer_parameters, self)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be scripted: its training step keeps a window in Python. "
            "Call cbn.revert_model(model) first: in eval mode the layer is nn.BatchNorm."
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}, "
            f"compensate={self.compensate}"
            + (", differentiable_compensation=False" if self.compensate and not self.differentiable_compensation else "")
        )

    # ----------------------------------------------------------------------------- producer
    def attach(self, registry: ProducerRegistry, name: str) -> None:
        """Let this layer look for its producer among ``registry``'s taps (done by ``convert_model``)."""
        self._registry = registry
        self._layer_name = name or self._layer_name
        self._pairing = _UNRESOLVED
        self._producer = None
        self._producer_parameters = []
        self._call = None

    @property
    def producer(self) -> nn.Module | None:
        """The convolution or linear layer found to produce this layer's input, if any."""
        return self._producer[0] if self._producer is not None else None

    def _discover_producer(self, input: Tensor) -> None:
        found = self._registry.find(input) if self._registry is not None else None
        refusal = self._refuse_producer(*found, input) if found is not None else _NO_PRODUCER
        if refusal is None:
            self._producer = found
            self._producer_parameters = list(found[0].parameters())
            self._weight_set_at_call = weight_set_at_call(found[0])
            self._through_view = found[1].output_of(input) is not input
            watch_parameters(self._producer_parameters, self)
            found[1].claimed = True
            found[1].keep_input = True  # a norm paired after discovery closed (a late branch)
            self._pairing = _PAIRED
            self._allocate_gradient_window(found[0], found[1])
            return
        self._pairing = _UNPAIRED
        self._unpaired_reason = refusal
        if self._registry is not None:
            self._registry.unpaired.append(f"{self._layer_name} ({refusal})")
        else:
            warnings.warn(
                f"{self._layer_name} has no known producer and averages uncompensated statistics; "
                "convert the model with cbn.convert_model(model) to pair it with its convolution.",
                stacklevel=3,
            )

    def _refuse_producer(self, producer: nn.Module, tap: ProducerTap, input: Tensor) -> str | None:
        """Why ``producer`` (whose output is ``input``) cannot be paired, or ``None`` if it can."""
        name = type(producer).__name__
        if tap.modified_in_place(input):
            return (f"input modified in place after {name} (e.g. an in-place activation between them): "
                    "not the producer's output")
        if isinstance(tap, CapturingTap) and tap.call is None:
            return tap.failure or f"custom forward of {name} could not be observed"
        if isinstance(producer, nn.Linear):
            if input.dim() != 2:
                return f"{name} output of rank {input.dim()}: only (N, C) outputs of a linear layer pair"
            return None if producer.out_features == self.num_features else f"{name} has another channel count"
        return None if producer.out_channels == self.num_features else f"{name} has another channel count"

    def pairing_status(self) -> tuple[bool, nn.Module | None, str]:
        """``(compensated, producer, reason)``: whether the Taylor step is applied, and why not.

        ``reason`` is empty when compensated. See :func:`cbn.pairing_report` for a whole model.
        """
        if not self.compensate:
            return False, self.producer, "compensate=False (naive cross-iteration averaging)"
        if self.window == 1:
            return False, self.producer, "window=1 (BatchNorm)"
        if self._pairing == _UNRESOLVED:
            return False, None, "no training forward yet"
        if self._pairing == _UNPAIRED:
            return False, None, self._unpaired_reason
        if not self._trainable_producer_weights():
            return False, self.producer, "producer frozen (no trainable weight: nothing to compensate)"
        return True, self.producer, ""

    def _allocate_gradient_window(self, producer: nn.Module, tap: ProducerTap) -> None:
        if not self.compensate or self.window == 1:
            return
        past = self.window - 1
        # The weight of the observed call: reading a parametrized weight again would run the
        # parametrization (a spectral norm's power iteration) once more.
        weight = tap.call.weight if isinstance(tap, CapturingTap) else producer.weight
        fan_in = weight_rows(producer, weight.detach()).shape[1]
        rows = past * self._positions
        shapes = {
            "window_mean_grad": (producer_groups(producer), rows, fan_in),
            "window_var_grad": (self.num_features, rows, fan_in),
        }
        for name, shape in shapes.items():
            buffer = getattr(self, name)
            if buffer.shape != shape:
                setattr(self, name, buffer.new_zeros(shape))
                self.window_stats[:, _MEAN_SHIFT:_SAMPLES].zero_()

    def _producer_input(self, input: Tensor, warn: bool = True) -> Tensor | None:
        """The input of the convolution that made ``input`` (and, for a custom forward, its call).

        ``None`` (the entry is stored uncompensated) when ``input`` is not the producer's latest
        output as the producer returned it: another tensor, or the same one modified in place
        since (an in-place activation between them), whose statistics the producer's derivative
        does not describe. The first forward of a layer paired late has no kept input either.
        """
        if self._producer is None:
            return None
        tap = self._producer[1]
        produced, modified = tap.produced(input), tap.modified_in_place(input)
        producer_input = tap.take_input(input)
        if isinstance(tap, CapturingTap):
            self._call = tap.call
        if warn and (not produced or modified) and not self._warned_mismatch:
            self._warned_mismatch = True
            what = ("was modified in place after its producer" if produced
                    else "is not the latest output of its producer")
            warnings.warn(
                f"{self._layer_name}: this input {what} {type(self.producer).__name__}; its statistics "
                "are stored uncompensated.",
                stacklevel=3,
            )
        return producer_input

    def _trainable_producer_weights(self) -> list[Tensor]:
        """The producer's trainable parameters: ``weight`` and ``bias``, or what a parametrization
        (``weight_norm``, ...) computes them from, whose version counters mark the iterations."""
        return [p for p in self._producer_parameters if p.requires_grad]

    @property
    def _computation(self) -> nn.Module | ConvolutionCall | None:
        """What computed the current input: the producer, or the F.convNd call of a custom forward."""
        if self._producer is None:
            return None
        return self._call if self._custom_producer else self._producer[0]

    @property
    def _weight_known_late(self) -> bool:
        """The weight the producer uses in a forward is known only once it has run (a custom
        ``forward``, or a pre-hook that sets it): the window is summarized at the layer's forward."""
        return self._custom_producer or self._weight_set_at_call

    @property
    def _custom_producer(self) -> bool:
        """Paired with a convolution whose custom ``forward`` is observed call by call."""
        return self._producer is not None and isinstance(self._producer[1], CapturingTap)

    def _advance_iteration(self, input: Tensor, position: int = 0) -> None:
        """Count an iteration when the producer's weights changed since the last training forward.

        A frozen or unknown producer counts every training forward as an iteration. Within one
        iteration (gradient accumulation), an input of another spatial size is refused: it is the
        sign of one norm applied to several inputs, e.g. the levels of a feature pyramid, whose
        statistics would be mixed in one window (see ``check_shared_use``).
        """
        weights = self._trainable_producer_weights()
        versions = tuple(w._version for w in weights) if weights else None
        new_iteration = versions is None or versions != self._weight_versions
        shape = input.shape[2:]
        seen = self._iteration_shape.get(position)
        if not new_iteration and self.check_shared_use and seen not in (None, shape):
            raise ValueError(
                f"{self._layer_name} got inputs of spatial sizes {tuple(seen)} and "
                f"{tuple(shape)} with unchanged producer weights, so both count as one iteration. "
                "Either no weight update happened between two training forwards (the producer is in "
                "no optimizer, a step was skipped, or model.eval() was forgotten before a validation "
                "or no_grad pass: call model.eval() there), or one norm is applied to several inputs "
                "outside one model forward (e.g. feature-pyramid levels, which inside a converted "
                "model's forward get one window each), which would mix their statistics in one "
                "window: give each input its own norm layer. For gradient accumulation over inputs "
                "of varying size, construct the layer (or convert_model) with check_shared_use=False."
            )
        if new_iteration:
            self._iteration_shape = {}
            self._positions_fixed = self._positions_fixed or self._iterations > 0
        self._iteration_shape[position] = shape
        self._forward_since_count = True
        if new_iteration:
            self._set_iterations(self._iterations + 1)
            self._unchanged_forwards, self._weight_probe = 0, None
            self._kept_pasts = []
        elif not self._warned_unmarked:
            self._unchanged_forwards += 1
            self._check_unmarked_updates(weights[0])
        self._weight_versions = versions

    def _set_iterations(self, count: int) -> None:
        self._iterations = count
        # What a compiled forward reads instead of the count, so that it recompiles once, when
        # burn-in ends, and not at every step.
        self._burnin_over = count > self.burnin

    def count_weight_update(self) -> bool:
        """Count the iteration an optimizer step (or :func:`cbn.mark_step`) just made.

        Called by the step hook of :mod:`cbn.iterations` for every paired layer that has run a
        training forward since its last counted iteration, with the same version comparison as
        :meth:`_advance_iteration` (the next eager forward then sees no change). It is what
        counts iterations for a layer that trains inside a compiled graph, which cannot read
        version counters. A step without such a forward is left to the next forward to count.
        """
        if not self._forward_since_count:
            return False
        weights = self._trainable_producer_weights()
        versions = tuple(w._version for w in weights) if weights else None
        if versions is None or versions == self._weight_versions:
            return False
        self._weight_versions = versions
        self._forward_since_count = False
        self._set_iterations(self._iterations + 1)
        self._iteration_shape = {}
        self._positions_fixed = True
        self._unchanged_forwards, self._weight_probe = 0, None
        self._kept_pasts = []
        self.iteration_count.add_(1)
        return True

    def _check_unmarked_updates(self, weight: Tensor) -> None:
        """Warn once if the producer's weight moves while its version counter does not.

        Runs only in long streaks of training forwards in one iteration: a copy of the weight is
        taken half-way through :data:`cbn.iterations.SUSPICIOUS_FORWARDS` and compared at its end.
        """
        if self._unchanged_forwards == SUSPICIOUS_FORWARDS // 2:
            self._weight_probe = weight.detach().clone()
        elif self._unchanged_forwards >= SUSPICIOUS_FORWARDS and self._weight_probe is not None:
            moved = not torch.equal(self._weight_probe, weight)
            self._unchanged_forwards, self._weight_probe = 0, None
            if moved:
                self._warned_unmarked = True
                warnings.warn(
                    f"{self._layer_name}: the weights of its producer {type(self.producer).__name__} changed "
                    f"during {SUSPICIOUS_FORWARDS} training forwards without a change of their version "
                    "counter, so no iteration was counted and burn-in does not advance. Weights written "
                    "through .data outside a torch.optim optimizer are invisible to the layer: call "
                    "cbn.mark_step(model) after each update.",
                    stacklevel=5,
                )

    @property
    def _in_burnin(self) -> bool:
        return self._iterations <= self.burnin

    @property
    def _compensating(self) -> bool:
        return self._buffers["window_var_grad"].numel() > 0

    # ----------------------------------------------------------------------------- maths
    def _current_shifts(self) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """First-order terms of the stored gradients at the current weights, ``(k-1, C)`` each."""
        operands = self._shift_operands()
        if operands is None:
            return None, None
        # The kernel that computes the new entries' terms too (a Taylor step at unchanged weights
        # must cancel exactly).
        (mean_shift,), (var_shift,) = statistic_shifts_of_layers([operands])
        return mean_shift, var_shift

    def _shift_operands(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None] | None:
        """``(mean gradients, variance gradients, weight, bias)`` whose :func:`statistic_shifts` are
        the window's first-order terms at the current weights; ``None`` when not compensating."""
        computation = self._computation
        if not self._compensating or computation is None:
            return None
        buffers = self._buffers
        return (buffers["window_mean_grad"], buffers["window_var_grad"],
                shift_weight(computation, computation.weight), computation.bias)

    def _moved_window(self) -> tuple[Tensor, Tensor]:
        """Past entries moved to the current weights (unmoved when not compensating), ``(k-1, C)``."""
        stats = self.window_stats
        mean_now, var_now = self._current_shifts()
        if mean_now is None:
            return stats[:, _MEAN], stats[:, _VAR]
        return move_to_current_weights(
            stats[:, _MEAN], stats[:, _VAR], stats[:, _MEAN_SHIFT], stats[:, _VAR_SHIFT], mean_now, var_now
        )

    def _past_statistics(self, position: int = 0) -> PastStatistics | None:
        """Summary of the valid past entries of a call position, or ``None`` when this step is
        plain BatchNorm. The model-level summary (:mod:`cbn.model_step`) is position 0's."""
        prepared, self._prepared_past = self._prepared_past, None
        if self.window == 1 or self._in_burnin:
            return None
        if self._differentiates_past:  # (a summary prepared before the layer paired is not used)
            usable = isinstance(prepared, CompensationJacobian) and position == 0
            return self._differentiable_past(prepared if usable else None, position)
        if prepared is not None and position == 0:
            return prepared
        with torch.no_grad():
            stats = self.window_stats
            mean_now, var_now = self._current_shifts()
            if self._positions > 1:
                rows = self._rows(position)
                stats = stats[rows]
                if mean_now is not None:
                    mean_now, var_now = mean_now[rows], var_now[rows]
            return pool_window(stats, mean_now, var_now)

    @property
    def _differentiates_past(self) -> bool:
        """Whether the past summary is a function of the producer's current weight and bias."""
        return self.differentiable_compensation and self._compensating and self._computation is not None

    def _differentiable_past(self, prepared=None, position: int = 0) -> PastStatistics:
        """The past summary of a call position, carrying gradients to the producer's weight and
        bias where autograd is on; ``prepared``: its :class:`CompensationJacobian` from the
        model-level step."""
        mean_grad, var_grad, weight, bias = self._shift_operands()
        if prepared is None:
            stats = self.window_stats
            with torch.no_grad():
                (mean_now,), (var_now,) = statistic_shifts_of_layers([(mean_grad, var_grad, weight, bias)])
            if self._positions > 1:
                rows = self._rows(position)
                stats, mean_now, var_now = stats[rows], mean_now[rows], var_now[rows]
                mean_grad, var_grad = mean_grad[:, rows], var_grad[:, rows]
            (prepared,) = compensation_jacobians(stats, mean_now, var_now, [(mean_grad, var_grad)])
        if not torch.is_grad_enabled():
            # The Jacobians stay with the summary, unattached: a recompute under autograd
            # (reentrant activation checkpointing) attaches them (``_recompute_forward``).
            return prepared.past._replace(attachment=(None, None, prepared))
        return attach_to_producer(prepared, weight, bias)

    @property
    def _will_pool(self) -> bool:
        """Whether the next training forward pools past entries (burn-in will be over)."""
        return self.training and self.window > 1 and self._iterations >= self.burnin

    def _entry_gradient_operands(self, record: StepRecord) -> tuple | None:
        """The :func:`producer_statistic_gradients` operands of a recorded batch (in the statistics
        dtype), or ``None`` where its gradients are not needed."""
        wanted = (
            self._compensating
            and record.producer_input is not None
            and bool(self._trainable_producer_weights())
            and self._iterations > self.burnin - self.window + 1
        )
        if not wanted:
            # Weights that do not move (or entries evicted before burn-in ends) need no Taylor step.
            return None
        dtype = self._buffers["window_stats"].dtype
        producer_input, output = record.producer_input, record.output
        producer_input = producer_input if producer_input.dtype == dtype else producer_input.to(dtype)
        output = output if output.dtype == dtype else output.to(dtype)  # under no_grad
        return record.computation, producer_input, output, record.stats.batch_mean

    def _pooled_entry_gradients(self, record: StepRecord, gradients: StatisticGradients) -> StatisticGradients:
        """With a process group, the record's mean is the global mean and ``samples`` the global
        count (a tensor): each rank's gradients, centred on the global mean, are pooled over the
        ranks. Otherwise ``gradients`` as they are."""
        if isinstance(record.samples, Tensor):
            local_samples = record.output.numel() // self.num_features
            gradients = all_reduce_statistic_gradients(gradients, local_samples, record.samples, self.process_group)
        return gradients

    # ----------------------------------------------------------------------------- production
    @property
    def _cross_process(self) -> bool:
        """Pool the batch over ``process_group``: set, initialized and with more than one rank."""
        return (
            self.process_group is not None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    # ----------------------------------------------------------------------------- forward
    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError  # given by the Input1d/2d/3d mixins of the public classes

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            raise TypeError(
                f"{type(self).__name__} cannot be traced by torch.fx: its training step keeps a window "
                "in Python. Call cbn.revert_model(model) first (eval-mode CBN is BatchNorm), or make "
                "the tracer treat it as a leaf module."
            )
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {input.shape[1]} "
                f"channels (shape {tuple(input.shape)})"
            )
        if not self.training:
            use_running = self.track_running_stats and self.running_mean is not None
            return F.batch_norm(
                input,
                self.running_mean if use_running else None,
                self.running_var if use_running else None,
                self.weight,
                self.bias,
                not use_running,
                0.0,
                self.eps,
            )
        if input.numel() == 0:
            # As nn.BatchNorm: an empty batch gives an empty output and changes no state.
            self._producer_input(input, warn=False)
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # A training step under inference_mode records like one under no_grad; its state
            # (window, lazily made buffers, caches) must not become inference tensors, which
            # every later training step would be refused to update.
            with torch.inference_mode(False), torch.no_grad():
                return self.forward(input)
        if torch.is_autocast_enabled(input.device.type):
            # Statistics, windows and Taylor terms stay in float32: autocast would run the
            # matmuls of the statistic shifts in half precision.
            with torch.autocast(input.device.type, enabled=False):
                return self._training_forward(input)
        return self._training_forward(input)

    def _training_forward(self, input: Tensor) -> Tensor:
        """The training forward in three stages: bookkeeping, normalization, recording.

        Eager: the bookkeeping reads and writes Python state (producer taps, host counters,
        weight versions); in a converted model's forward the recording is written with all
        layers' at once (:mod:`cbn.layers.window_record`). Under ``torch.compile`` a paired layer
        runs :meth:`_compiled_training_forward` (no graph break); the first forward, which pairs
        the layers, runs the bookkeeping eagerly (``torch.compiler.disable``, graph breaks).

        With a process group, every rank computes the same pooled statistics and statistic
        gradients, so every rank stores the same entry and keeps the same window: ``P`` ranks of
        ``B`` examples with window ``k`` estimate from ``P * B * k`` examples. With ``window=1``
        this is ``nn.SyncBatchNorm``.
        """
        compiling = torch.compiler.is_compiling()
        if not compiling and in_backward_recompute():
            return self._recompute_forward(input)
        if compiling and self._pairing != _UNRESOLVED and not self._cross_process and self._positions == 1:
            return self._compiled_training_forward(input)
        if self._next_slot is None:  # compiled steps moved the slot on the device
            self._next_slot = int(self.window_next.view(-1)[0])
        position = self._next_call_position_outside_graph() if compiling else self._next_call_position()
        prepare = self._prepare_step_outside_graph if compiling else self._prepare_step
        past, producer_input = prepare(input, position)
        if self._cross_process:
            output, stats, samples = cross_process_batch_norm(
                input, past, self.weight, self.bias, self.eps, self.window_stats.dtype, self.process_group
            )
        else:
            output, stats = cross_iteration_batch_norm(
                input, past, self.weight, self.bias, self.eps, self._buffers["window_stats"].dtype
            )
            samples = input.numel() // self.num_features
        record = self._record_step_outside_graph if compiling else self._record_step
        output_of_producer = input
        if producer_input is not None and self._through_view and not self._producer[1].channel_last:
            # A convolution's statistic gradients are taken on its output in its own layout (a
            # linear layer's on (M, C) rows, which the view already is).
            output_of_producer = self._producer[1].output_of(input)
            output_of_producer = input if output_of_producer is None else output_of_producer
        record(stats, samples, past, producer_input, output_of_producer, position)
        return output

    def _next_call_position(self) -> int:
        """This call's position in the running model forward (0 outside one), with a window
        allocated for it. Positions restart at each forward of a converted model."""
        if collector_for(self) is None:
            return 0
        position = self._call_position
        self._call_position = position + 1
        if position >= self._positions and self.window > 1:
            self._add_call_position()
        return position

    _next_call_position_outside_graph = torch.compiler.disable(_next_call_position)

    def start_model_forward(self) -> tuple[tuple, Tensor, tuple | None] | None:
        """Called by the model-level step when a converted model's forward begins: the next call
        of this norm is its first of that forward, and no summary is prepared yet.

        Returns what a summary of the window for that first call is computed from, when the model
        step may compute it with other layers' (:func:`cbn.model_step.prepare_past_statistics`):
        ``(group key, window, statistic-shift operands or None)``; else ``None``.
        """
        self._call_position = 0
        self._prepared_past = None
        # Late weights are known at the call only; several call positions summarize at each call.
        if not self._will_pool or self._weight_known_late or self._positions > 1:
            return None
        stats = self._buffers["window_stats"]
        compensating = self._compensating
        # (differentiable compensation: the model step prepares CompensationJacobians instead)
        key = (self.window, stats.dtype, stats.device, self._differentiates_past, compensating)
        return key, stats, self._shift_operands() if compensating else None

    def use_prepared_past(self, past: PastStatistics | CompensationJacobian) -> None:
        """Take ``past``, the summary of this layer's window computed with other layers' by the
        model-level step (with its Jacobians, under differentiable compensation), for this
        forward's first call."""
        self._prepared_past = past

    def claim_entry_row(self, position: int) -> tuple[int, Tensor, int]:
        """Where the next entry of call position ``position`` goes, and advance that position's
        slot: ``(row of the window buffers, the position's slot counter buffer, its new value)``.
        The caller writes the counter (with other layers', at once)."""
        past = self.window - 1
        if position == 0:
            slot = self._next_slot
            self._next_slot = (slot + 1) % past
            counter = self._buffers["window_next"] if self._positions == 1 else self.window_next[0]
            return slot, counter, self._next_slot
        slot = self._extra_slots[position - 1]
        self._extra_slots[position - 1] = (slot + 1) % past
        return position * past + slot, self.window_next[position], self._extra_slots[position - 1]

    def _recompute_forward(self, input: Tensor) -> Tensor:
        """The forward again, as activation checkpointing (``torch.utils.checkpoint``, either
        ``use_reentrant``) runs it during backward: the same output as the original forward.

        It normalizes with the past statistics that forward used (the window has since received
        its entry), records nothing and counts no iteration. The original forward is the latest
        of this iteration with an input of the same shape (gradient accumulation runs each
        micro-batch's backward before the next forward; the levels of a feature pyramid differ
        in shape).
        """
        self._producer_input(input, warn=False)  # release what the producer's tap kept
        for shape, past in reversed(self._kept_pasts):
            if shape == input.shape:
                break
        else:
            raise RuntimeError(
                f"{self._layer_name} is recomputed during backward (activation checkpointing) with an "
                f"input of shape {tuple(input.shape)} that no training forward of this iteration had; "
                "the statistics of the original forward cannot be found."
            )
        if past is not None and past.attachment is not None and past.attachment[0] is None and torch.is_grad_enabled():
            # The original forward ran without autograd (reentrant checkpointing): differentiable
            # compensation attaches its Jacobians to the weights of this recompute.
            _, _, weight, bias = self._shift_operands()
            past = attach_to_producer(past.attachment[2], weight, bias)
        if self._cross_process:
            output, _, _ = cross_process_batch_norm(
                input, past, self.weight, self.bias, self.eps, self.window_stats.dtype, self.process_group
            )
            return output
        output, _ = cross_iteration_batch_norm(
            input, past, self.weight, self.bias, self.eps, self._buffers["window_stats"].dtype
        )
        return output

    def _compiled_training_forward(self, input: Tensor) -> Tensor:
        """The training step inside a ``torch.compile`` graph, without a graph break.

        Only tensor operations and reads of Python state that is constant between steps: the
        pairing (found by the first, eager or graph-breaking, forward), ``_burnin_over`` (one
        recompile when burn-in ends). The window slot is the ``window_next`` buffer, validity is
        a tensor mask, and iterations are counted by the optimizer step hook
        (:meth:`count_weight_update`). A producer with a custom ``forward`` is not observed here:
        its entries are stored uncompensated.
        """
        self._compiled_mode = True
        self._forward_since_count = True
        self._next_slot = None
        samples = input.numel() // self.num_features
        pooled = self.window > 1 and self._burnin_over
        if samples <= 1 and not pooled:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        producer_input = None
        # A view of the producer's output cannot be traced back to it inside a graph.
        observed = self._producer is not None and not self._custom_producer and not self._through_view
        if observed:
            tap = self._producer[1]
            producer_input, tap._input = tap._input, None
        dtype = self.window_stats.dtype
        if pooled and observed and self._differentiates_past:
            past = self._differentiable_past()
        else:
            with torch.no_grad():
                shifts = self._current_shifts() if observed else (None, None)
                past = pool_window(self.window_stats, *shifts) if pooled else None
        output, stats = traceable_cross_iteration_batch_norm(input, past, self.weight, self.bias, self.eps, dtype)
        computation = self._producer[0] if observed else None
        record_step_in_graph(StepRecord(self, stats, samples, past.samples if past is not None else None,
                                        producer_input, input, computation))
        return output

    def _prepare_step(self, input: Tensor, position: int = 0) -> tuple[PastStatistics | None, Tensor | None]:
        """Producer pairing, iteration count and the past entries moved to the current weights."""
        if self._pairing == _UNRESOLVED:
            self._discover_producer(input)
        producer_input = self._producer_input(input)
        self._advance_iteration(input, position)
        pooled = self.window > 1 and not self._in_burnin
        samples = input.numel() // self.num_features
        if (
            samples <= 1
            and not self._cross_process
            and not (pooled and bool((self.window_stats[self._rows(position), _SAMPLES, 0] > 0).any()))
        ):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        past = self._past_statistics(position)
        kept = self._kept_pasts
        if len(kept) >= self._kept_pasts_limit:
            del kept[0]
        kept.append((input.shape, past))
        return past, producer_input

    def _record_step(self, stats, samples: int | Tensor, past, producer_input, input: Tensor, position: int = 0) -> None:
        """Record the step: window entry and running statistics (:mod:`cbn.layers.window_record`).

        In a converted model's training forward with autograd on, the record is written with all
        layers' after the forward (autograd keeps the tensors it holds unmodified until then);
        otherwise at once. ``samples`` is an int, or a 0-dim tensor when pooled over processes.
        """
        record = StepRecord(
            self, stats, samples, past.samples if past is not None else None,
            producer_input, input, self._computation, position,
        )
        step = collector_for(self)
        if step is not None and torch.is_grad_enabled() and not isinstance(samples, Tensor):
            step.defer(record)
        else:
            record_steps([record])

    # Outside a compiled graph only (the wrapper costs microseconds per call in eager mode).
    _prepare_step_outside_graph = torch.compiler.disable(_prepare_step)
    _record_step_outside_graph = torch.compiler.disable(_record_step)

    @torch.no_grad()
    def window_statistics(self) -> dict[str, Tensor]:
        """Stored past entries, newest first, raw and moved to the producer's current weights.

        Returns a dict of ``(n_past, C)`` tensors ``mean``, ``var``, ``mean_compensated``,
        ``var_compensated`` over the valid entries (the window is not modified).
        """
        past = self.window - 1
        if self._next_slot is None:
            self._next_slot = int(self.window_next.view(-1)[0])
        order = [(self._next_slot - offset) % past for offset in range(1, past + 1)] if past else []
        order = [slot for slot in order if float(self.window_stats[slot, _SAMPLES, 0]) > 0]
        moved_mean, moved_var = self._moved_window()
        return dict(
            mean=self.window_stats[order, _MEAN],
            var=self.window_stats[order, _VAR],
            mean_compensated=moved_mean[order],
            var_compensated=moved_var[order],
        )


_DOC_TEMPLATE = r"""Cross-Iteration Batch Normalization over a {rank} input (Yao et al., CVPR 2021).

    In training, the statistics of the last ``window - 1`` iterations are moved to the current
    weights of the layer that produces the input (a first-order Taylor step in that layer's
    weight and bias) and averaged with the current batch's:

    .. math::

        \mu_{{t-\tau}}(W_t) = \mu_{{t-\tau}} + \frac{{\partial\mu}}{{\partial W}}\cdot(W_t - W_{{t-\tau}}),\qquad
        \nu_{{t-\tau}}(W_t) = \nu_{{t-\tau}} + \frac{{\partial\nu}}{{\partial W}}\cdot(W_t - W_{{t-\tau}})

        \bar\mu = \frac1n\sum_\tau \mu_\tau,\qquad
        \bar\sigma^2 = \frac1n\sum_\tau \max(\nu_\tau, \mu_\tau^2) - \bar\mu^2,\qquad
        y = \frac{{x - \bar\mu}}{{\sqrt{{\bar\sigma^2 + \epsilon}}}} * \gamma + \beta

    with :math:`\nu = E[x^2]` and :math:`n \le` ``window`` the entries present. Gradients flow
    through the current batch's statistics only (with ``differentiable_compensation``, also
    through the moved past entries into the producer's weight and bias). The derivatives are
    computed in closed form (one extra weight-gradient convolution per step); no weight copy is
    kept, and the window lives in buffers, so ``state_dict`` resumes training exactly. Eval mode is
    :class:`torch.nn.{batchnorm}` with the running statistics, which are an exponential moving
    average (``momentum``; ``None`` for a cumulative average) of the pooled estimate with the
    variance unbiased over all pooled samples.

    The producer (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear``) is found by
    :func:`cbn.convert_model`, which also replaces existing BatchNorm layers. A convolution
    subclass with its own ``forward`` (padding the input, standardizing the weight) is observed
    call by call: the Taylor step is taken in the weight its ``F.convNd`` call really used, with
    that call's input. A layer with no producer, or whose producer's custom ``forward`` does not
    return one convolution's result, averages uncompensated statistics ("naive" CBN) and warns
    once; :func:`cbn.pairing_report` tells which and why.

    Args:
        num_features: :math:`C` from an expected input of size {shape}.
        eps: added to the variance inside the square root. Default: 1e-5
        momentum: factor of the running statistics' moving average; ``None`` for a cumulative
            average. Default: 0.1
        affine: learnable :math:`\gamma, \beta`. Default: ``True``
        bias: with ``affine``, learn :math:`\beta` too (keyword only). Default: ``True``
        track_running_stats: keep running statistics for eval mode; without them, eval
            normalizes with the batch's own statistics. Default: ``True``
        window: iterations pooled, the current one included; 1 is BatchNorm. Default: 4
        burnin: first training iterations that run as BatchNorm (entries are still stored).
            An iteration is a change of the version counter of the producer's weight or bias:
            every ``torch.optim`` optimizer step (plain, ``foreach``, ``fused``, and optimizers
            writing through ``.data``: ``cbn`` bumps the counters after each step), any in-place
            update, ``load_state_dict``, or :func:`cbn.mark_step` after a hand-written update
            through ``.data`` (such a loop without it is detected and warned about once). So
            several forwards with unchanged weights (gradient accumulation) are one iteration, a
            step skipped by ``GradScaler`` is none, and with no trainable producer each training
            forward is one (see :mod:`cbn.iterations`). Default: 0
        compensate: apply the Taylor step; ``False`` gives naive cross-iteration averaging.
            Default: ``True``
        differentiable_compensation: let the gradient flow through the Taylor-moved past
            entries, which are functions of the producer's current weight and bias, into that
            weight and bias (our extension; ``docs/method.md``, chosen as the default by the
            evidence of ``docs/results.md``); ``False`` is the paper's rule, past entries constant
            in backward. ``True`` needs ``compensate=True`` (keyword only).
            Default: ``None``, the value of ``compensate``
        process_group: pool each batch's statistics (and their weight gradients) over the ranks
            of this ``torch.distributed`` group before the window step (keyword only), so that
            ``P`` ranks of ``B`` examples with window ``k`` estimate from ``P * B * k`` examples;
            with ``window=1`` this is ``nn.SyncBatchNorm``. ``None``: each rank uses its own
            batches, like ``nn.BatchNorm`` under DDP. Default: ``None``
        check_shared_use: raise ``ValueError`` when training forwards of one iteration at the
            same call position get inputs of different spatial sizes: the sign of one norm
            applied to several inputs outside one model forward, whose statistics would be mixed
            in one window, or of a forgotten ``model.eval()`` (keyword only). Inside a converted
            model's forward, each call of the layer (e.g. one per feature-pyramid level of a
            shared head) has a window of its own. ``False`` for gradient accumulation over
            variable-size inputs. Default: ``True``

    Shape:
        - Input: {shape}
        - Output: same shape as the input

    Errors and edge cases:
        - An input of the wrong rank or channel count raises ``ValueError`` naming the expected
          shapes, before any state changes.
        - One value per channel in training raises BatchNorm's ``ValueError`` while no valid
          past entry exists (and always during burn-in or with ``window=1``); with past entries
          it is accepted, so batch size 1 after a linear layer trains.
        - A batch whose statistics (or Taylor terms) are not finite is not an error: its slot is
          marked invalid, so it never enters a later estimate, and the running statistics are
          left unchanged. Its own output is not finite, which AMP's ``GradScaler`` skips.
        - Batch and spatial sizes may change between iterations; each entry keeps its own count.
        - Weights changed outside an optimizer (e.g. ``load_state_dict``) are handled by the same
          Taylor step, and start a new iteration. Loading a plain BatchNorm state empties the window.

    Production training (see ``docs/multi-gpu.md``):
        - DDP: :func:`cbn.convert_model` registers the window buffers and ``num_iterations`` as
          buffers DDP ignores, so ``broadcast_buffers=True`` keeps each rank's window while the
          running statistics are broadcast from rank 0 like BatchNorm's.
        - AMP: under ``torch.autocast`` the statistics, window and Taylor terms are computed in
          float32 (autocast is disabled inside the layer); the output has the input's dtype.
        - ``torch.compile``: after one training forward has paired the layers (eager, or compiled
          with graph breaks), a training forward compiles to one graph, ``fullgraph=True``
          included, and recompiles once, when burn-in ends. In a compiled graph, iterations are
          counted by ``torch.optim`` steps and :func:`cbn.mark_step` only, and a producer with a
          custom ``forward`` stores uncompensated entries.
        - Several calls in one forward of a converted model (a head shared over pyramid
          levels): one window per call position, running statistics updated at every call as
          BatchNorm's; the number of calls may not grow after the first iteration. Gradient
          accumulation with unchanged weights pools the micro-batches (one entry each) as one
          iteration. See ``check_shared_use``.
        - Activation checkpointing (``torch.utils.checkpoint``): the recompute in backward uses
          the pooled statistics of its original forward and records nothing, so gradients are
          those of the model without checkpointing. See ``docs/reliability.md`` for every path
          (``update_bn``, copies, ``inference_mode``, half precision, in-place ops, ...).

    Example::

        >>> model = cbn.convert_model(nn.Sequential({producer}, nn.ReLU()))
        >>> out = model(torch.randn({example}))
"""


# The name used inside the package and by earlier code.
_CrossIterationBatchNorm = CrossIterationBatchNormBase


class CrossIterationBatchNorm1d(Input1d, _CrossIterationBatchNorm):
    __doc__ = _DOC_TEMPLATE.format(
        rank="2D or 3D",
        batchnorm="BatchNorm1d",
        shape=":math:`(N, C)` or :math:`(N, C, L)`",
        name="CrossIterationBatchNorm1d",
        producer="nn.Linear(8, 16), cbn.CrossIterationBatchNorm1d(16)",
        example="2, 8",
    )


class CrossIterationBatchNorm2d(Input2d, _CrossIterationBatchNorm):
    __doc__ = _DOC_TEMPLATE.format(
        rank="4D",
        batchnorm="BatchNorm2d",
        shape=":math:`(N, C, H, W)`",
        name="CrossIterationBatchNorm2d",
        producer="nn.Conv2d(3, 16, 3), cbn.CrossIterationBatchNorm2d(16)",
        example="2, 3, 8, 8",
    )


class CrossIterationBatchNorm3d(Input3d, _CrossIterationBatchNorm):
    __doc__ = _DOC_TEMPLATE.format(
        rank="5D",
        batchnorm="BatchNorm3d",
        shape=":math:`(N, C, D, H, W)`",
        name="CrossIterationBatchNorm3d",
        producer="nn.Conv3d(3, 16, 3), cbn.CrossIterationBatchNorm3d(16)",
        example="2, 3, 6, 8, 8",
    )


class CrossIterationBatchNorm(_CrossIterationBatchNorm):
    __doc__ = _DOC_TEMPLATE.format(
        rank="(N, C, *)",
        batchnorm="SyncBatchNorm",
        shape=":math:`(N, C, *)`",
        name="CrossIterationBatchNorm",
        producer="nn.Conv2d(3, 16, 3), cbn.CrossIterationBatchNorm(16)",
        example="2, 3, 8, 8",
    ) + "\n    Any input rank >= 2, like ``nn.SyncBatchNorm``: the layer ``convert_model`` puts in its place.\n"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *) with at least 2D, got {input.dim()}D input")
