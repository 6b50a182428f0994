"""Cross-Iteration BatchNorm layers (Yao et al., CVPR 2021), drop-in replacements of nn.BatchNorm."""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Proxy
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional.cross_process import cross_process_batch_norm
from ..functional.differentiable_compensation import attach_to_producer
from ..functional.normalization import cross_iteration_batch_norm
from ..functional.statistic_gradients import shift_weight
from ..iterations import IterationCounter, in_backward_recompute
from ..producer_call import ProducerCall, find_producer_call, producer_fingerprint, reading_would_recompute
from .._step_context import collector_for
from .input_rank import Input1d, Input2d, Input3d
from .recompute import KeptForwards
from .window_record import EntryTicket, StepRecord, fill_entry_gradients, record_steps
from .window_state import CrossIterationWindow, PreparedSummary, SummaryRequest, same_call

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class PairingOutcome(NamedTuple):
    """A compensated call's producer, for :meth:`CrossIterationBatchNormBase.pairing_status`."""

    trainable: bool
    parameters: tuple  # weak references to the producer's weight and bias parameters


class CrossIterationBatchNormBase(_BatchNorm):
    r"""Base of the Cross-Iteration BatchNorm layers; see :class:`CrossIterationBatchNorm2d`.

    A ``torch.nn.modules.batchnorm._BatchNorm``, so that what recognises BatchNorm by that test
    (``torch.optim.swa_utils.update_bn``, ``torch.ao`` and ``fuse_conv_bn_eval`` fusers, weight
    decay filters) recognises these layers; in eval mode they are BatchNorm.

    State, each piece with one owner: the affine parameters and running statistics as BatchNorm's
    (written by :mod:`cbn.layers.window_record`); the window of past entries
    (:class:`cbn.layers.window_state.CrossIterationWindow`, plain tensors, not in ``state_dict``);
    the iteration count (:class:`cbn.iterations.IterationCounter`, saved as the ``num_iterations``
    buffer); the forwards a recompute may replay (:class:`cbn.layers.recompute.KeptForwards`).
    The producer is read from autograd's record at every call (:mod:`cbn.producer_call`).
    """

    _version = 3

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
        _check_window(window)
        if not isinstance(burnin, int) or burnin < 0:
            raise ValueError(f"burnin must be an integer >= 0, got {burnin!r}")
        if differentiable_compensation is None:
            differentiable_compensation = compensate
        if differentiable_compensation and not compensate:
            raise ValueError("differentiable_compensation=True needs compensate=True: naive averaging "
                             "(compensate=False) has no Taylor terms to differentiate")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.burnin = burnin
        self.compensate = compensate
        self.process_group = process_group
        self.check_shared_use = check_shared_use  # accepted for compatibility: call positions replace it
        self.differentiable_compensation = differentiable_compensation
        stats_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        self._window_state = CrossIterationWindow(num_features, window, stats_dtype, device)
        self._counter = IterationCounter()
        self._kept = KeptForwards()
        self._last_pairing: PairingOutcome | str = "no training forward yet"
        self._prepared: PreparedSummary | None = None  # from the model-level step, for call position 0
        self._warned_unpaired = False
        self._known_producer: tuple | None = None  # ProducerCall.known of the latest paired call
        self.register_buffer("num_iterations", torch.zeros((), dtype=torch.long, device=device))

    # ----------------------------------------------------------------------------- state
    @property
    def window(self) -> int:
        """Entries pooled, the current one included. Setting it takes effect at once and empties
        the window (its entries were laid out for the old size)."""
        return self._window_state.window

    @window.setter
    def window(self, value: int) -> None:
        _check_window(value)
        if value != self.window:
            stats = self._window_state.positions[0].stats
            self._window_state = CrossIterationWindow(self.num_features, value, stats.dtype, stats.device)
            self._kept.clear()

    @property
    def window_state(self) -> CrossIterationWindow:
        """The window of past entries, per call position (read it; the layer writes it)."""
        return self._window_state

    @property
    def iterations(self) -> int:
        """Training iterations counted so far (:mod:`cbn.iterations`)."""
        return self._counter.count

    def reset_running_stats(self) -> None:
        """Reset the running statistics and empty the window (the iteration count, and so
        burn-in, goes on).

        What ``torch.optim.swa_utils.update_bn`` calls before recomputing the running statistics
        over a data set: the following training forwards then estimate them from that data at
        the current weights only, with no stored entry of older weights.
        """
        super().reset_running_stats()
        if "_window_state" in self.__dict__:  # called from _NormBase.__init__ before the window exists
            self._window_state.empty()
            self._kept.clear()

    def reset_window(self) -> None:
        """Empty the window of past entries and restart the iteration count (and burn-in)."""
        self._window_state.empty()
        self._kept.clear()
        self._counter.restart()

    def window_state_dict(self) -> dict:
        """The window's entries (not part of ``state_dict``): with :meth:`load_window_state_dict`
        after ``load_state_dict``, training resumes exactly. See :func:`cbn.window_state_dict`."""
        return self._window_state.state_dict()

    def load_window_state_dict(self, state: dict) -> None:
        """Restore the entries of :meth:`window_state_dict` (after ``load_state_dict``, which
        empties the window)."""
        self._window_state.load_state_dict(state)
        self._kept.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(state["_last_pairing"], PairingOutcome):  # weak references: a copy pairs anew
            state["_last_pairing"] = "no training forward since this copy was made"
        state["_known_producer"] = None  # (it holds the original's parameters)
        return state

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._window_state.apply(fn)
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.num_iterations.fill_(self._counter.count)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "num_iterations"
        if key not in state_dict:  # a BatchNorm state: start counting anew
            state_dict[key] = torch.zeros((), dtype=torch.long)
        for old in ("window_stats", "window_mean_grad", "window_var_grad", "window_next"):
            state_dict.pop(prefix + old, None)  # windows of earlier versions: not state any more
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # New weights make every stored entry stale: the window starts empty.
        self._window_state.empty()
        self._kept.clear()
        self._counter.restart(int(self.num_iterations))

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

    def _set_plain(self, name: str, value) -> None:
        # A per-call attribute that is no parameter, buffer or module: written without
        # nn.Module.__setattr__, whose checks cost more than the value at every training call.
        self.__dict__[name] = value

    # ----------------------------------------------------------------------------- pairing
    def pairing_status(self) -> tuple[bool, tuple, str]:
        """``(compensated, producer parameters, reason)`` of the latest training forward: whether
        the Taylor step was applied, the producer's leaf parameters, and why not (empty when
        compensated). See :func:`cbn.pairing_report` for a whole model."""
        if not self.compensate:
            return False, (), "compensate=False (naive cross-iteration averaging)"
        if self.window == 1:
            return False, (), "window=1 (BatchNorm)"
        found = self._last_pairing
        if isinstance(found, str):
            return False, (), found
        parameters = tuple(p for p in (ref() for ref in found.parameters) if p is not None)
        if not found.trainable:
            return False, parameters, "producer frozen (no trainable weight: nothing to compensate)"
        return True, parameters, ""

    def _pair(self, input: Tensor) -> ProducerCall | None:
        known = self._known_producer
        found = find_producer_call(input, self.num_features, known)
        if isinstance(found, ProducerCall):
            if found.known is not known or not isinstance(self._last_pairing, PairingOutcome):
                # (the same known producer: the same parameters, the outcome already written)
                self._set_plain("_known_producer", found.known)
                # Weakly: the report must not keep a producer alive (nor its activations).
                outcome = PairingOutcome(found.trainable, tuple(weakref.ref(p) for p in found.parameters))
                self._set_plain("_last_pairing", outcome)
            return found
        self._set_plain("_last_pairing", found)
        if self.compensate and self.window > 1 and not self._warned_unpaired and collector_for(self) is None:
            self._warned_unpaired = True
            warnings.warn(f"{type(self).__name__}({self.num_features}) averages uncompensated statistics: {found}. "
                          "cbn.pairing_report(model) lists every norm layer.", stacklevel=4)
        return None

    # ----------------------------------------------------------------------------- forward
    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError  # given by the Input1d/2d/3d mixins of the public classes

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
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
            return F.batch_norm(input, self.running_mean if use_running else None,
                                self.running_var if use_running else None, self.weight, self.bias,
                                not use_running, 0.0, self.eps)
        if input.numel() == 0:
            # As nn.BatchNorm: an empty batch gives an empty output and changes no state.
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # A training step under inference_mode records like one under no_grad; its state
            # must not become inference tensors, which later training steps could not update.
            with torch.inference_mode(False), torch.no_grad():
                return self.forward(input)
        if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(input.device.type):
            # Statistics, windows and Taylor terms stay in float32: autocast would run the
            # matmuls of the statistic shifts in half precision.
            with torch.autocast(input.device.type, enabled=False):
                return self._training_forward(input)
        return self._training_forward(input)

    def _training_forward(self, input: Tensor) -> Tensor:
        """One training step: pair, count, summarize the window, normalize, record.

        Every piece of state changes after the checks, so a refused batch changes nothing. Under
        ``torch.compile`` it runs outside the graph (see ``docs/reliability.md``).
        """
        if torch.compiler.is_compiling():
            return self._training_forward_outside_graph(input)
        if in_backward_recompute():
            return self._replay(input)
        call = self._pair(input)
        state = self._window_state
        key, fingerprint = self._weights_seen(call)
        decision = self._counter.decide(key, fingerprint)
        index = 0 if decision.new_iteration else state.next_position
        pooled = self.window > 1 and self._counter.count + decision.new_iteration > self.burnin
        position = state.position(index) if self.window > 1 else None
        samples = input.numel() // self.num_features
        if samples <= 1 and not self._cross_process and not (pooled and position.has_entries()):
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        # Commit: count, call position, producer of the position.
        self._counter.commit(decision)
        if decision.new_iteration:
            state.restart_positions()
            if decision.key is not None:  # (a layer without producer counts every forward)
                self._kept.clear()
        grad_recorded = torch.is_grad_enabled() and input.requires_grad
        state.take_position(advance=grad_recorded)
        computation = position.bind(call) if position is not None and self.compensate else None
        prepared = self._prepared
        self._set_plain("_prepared", None)
        if pooled and index == 0 and prepared is not None and same_call(prepared.recipe, computation):
            past = prepared.summary if computation is None else position.attach(prepared.summary, computation)
        else:
            past = position.summary(computation, self.differentiable_compensation) if pooled else None
        if self._cross_process:
            output, stats, samples = cross_process_batch_norm(input, past, self.weight, self.bias, self.eps,
                                                              _stats_dtype(state), self.process_group)
        else:
            output, stats = cross_iteration_batch_norm(input, past, self.weight, self.bias, self.eps,
                                                       _stats_dtype(state))
        step = collector_for(self)
        ticket = self._record(position, stats, samples, past, call, computation, step)
        if not grad_recorded or reading_would_recompute():  # a forward activation checkpointing may replay
            self._kept.keep(stats.batch_mean, past, ticket)
        if grad_recorded and output.requires_grad and step is None:
            # (a converted model's step restarts the positions at each of its forwards instead)
            output.register_hook(state.restart_positions)
        return output

    _training_forward_outside_graph = torch.compiler.disable(_training_forward)

    def _weights_seen(self, call: ProducerCall | None) -> tuple[object, float | None]:
        """``(producer key, fingerprint of its weights)`` for :class:`~cbn.iterations.IterationCounter`:
        of this call's producer, or for a call without autograd record (``no_grad``, reentrant
        checkpointing) of the parameters the next call position last used."""
        if call is not None:
            if not call.trainable:
                return call.signature, None
            fingerprint = call.fingerprint
            return call.signature, producer_fingerprint(call.computation) if fingerprint is None else fingerprint
        state = self._window_state
        position = state.positions[min(state.next_position, len(state.positions) - 1)]
        recipe = position.live_recipe()
        return (None, None) if recipe is None else (position.signature, producer_fingerprint(recipe))

    def _replay(self, input: Tensor) -> Tensor:
        """The forward again, as activation checkpointing (either ``use_reentrant``) runs it in
        backward: normalized with the past summary of the forward it replays, which
        :class:`~cbn.layers.recompute.KeptForwards` finds by the batch mean; nothing recorded."""
        dtype = _stats_dtype(self._window_state)
        with torch.no_grad():
            batch_mean = input.to(dtype).mean([d for d in range(input.dim()) if d != 1])
        batch_mean, past, ticket = self._kept.find(batch_mean, self.num_features)
        unattached = past is not None and past.attachment is not None and past.attachment[0] is None
        if (ticket is not None or unattached) and torch.is_grad_enabled():
            call = find_producer_call(input, self.num_features)
            if isinstance(call, ProducerCall) and ticket is not None and call.input is not None and self.compensate:
                # The forward could not read its producer's input: its entry's gradients now.
                ticket.window.bind(call, keep=self._kept.pending_slots(ticket.window) | {ticket.slot})
                fill_entry_gradients(ticket, call.computation, call.input, call.output, batch_mean)
            if isinstance(call, ProducerCall) and unattached:
                # The original forward ran without autograd (reentrant checkpointing): differentiable
                # compensation attaches its Jacobians to the producer of this recompute.
                weight = shift_weight(call.computation, call.computation.weight)
                past = attach_to_producer(past.attachment[2], weight, call.computation.bias)
        if self._cross_process:
            return cross_process_batch_norm(input, past, self.weight, self.bias, self.eps, dtype, self.process_group)[0]
        return cross_iteration_batch_norm(input, past, self.weight, self.bias, self.eps, dtype)[0]

    def _record(self, position, stats, samples, past, call: ProducerCall | None, computation,
                step) -> EntryTicket | None:
        """Record the step (window entry, statistic gradients, running statistics): with all
        layers' after a converted model's forward (``step``, the model-level step collecting this
        layer's records, or ``None``), else at once (:mod:`cbn.layers.window_record`). Returns the
        entry's ticket when its gradients are to be filled in by a recompute."""
        wants_gradients = (
            position is not None and self.compensate
            and self._counter.count > self.burnin - self.window + 1  # entries evicted before burn-in ends need none
        )
        source = None
        if wants_gradients and call is not None and call.input is not None and position.has_gradients:
            source = (call.computation, call.input, call.output)
        ticket = None
        if wants_gradients and source is None and (call is None or call.trainable) and not isinstance(samples, Tensor):
            # No input in this forward (no autograd record, or checkpointing): a recompute may bring it.
            ticket = EntryTicket(position)
        record = StepRecord(self, position, stats, samples, past.samples if past is not None else None,
                            source, computation, self.process_group, ticket)
        if step is not None and torch.is_grad_enabled() and not isinstance(samples, Tensor):
            step.defer(record)
        else:
            record_steps([record])
        return ticket

    @property
    def _cross_process(self) -> bool:
        """Pool the batch over ``process_group``: set, initialized and with more than one rank."""
        return (self.process_group is not None and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def request_summary(self) -> SummaryRequest | None:
        """What :func:`cbn.model_step.prepare_summaries` needs to summarize this layer's window
        (call position 0) with other layers' before a converted model's forward, or ``None``
        where the layer will compute its own (it will not pool, or its producer is not known to
        be current)."""
        self._set_plain("_prepared", None)
        if self.window == 1 or self._counter.count + 1 <= self.burnin:
            return None
        return self._window_state.positions[0].summary_request(self.compensate, self.differentiable_compensation)

    def use_prepared_summary(self, prepared: PreparedSummary) -> None:
        """Take the summary the model-level step computed; used at the first call of the forward
        if that call's producer is the one it was computed for (else the layer computes its own)."""
        self._set_plain("_prepared", prepared)

    def window_statistics(self, position: int = 0) -> dict[str, Tensor]:
        """Stored past entries of a call position, newest first, raw and moved to the weights of
        the producer's latest training forward: a dict of ``(n_past, C)`` tensors ``mean``,
        ``var``, ``mean_compensated``, ``var_compensated`` (the window is not modified)."""
        return self._window_state.position(position).statistics(self.compensate)

def _check_window(window) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (1 is BatchNorm), got {window!r}")


def _stats_dtype(state: CrossIterationWindow) -> torch.dtype:
    return state.positions[0].stats.dtype


_DOC_TEMPLATE = r"""Cross-Iteration Batch Normalization over a {rank} input (Yao et al., CVPR 2021).

    In training, the statistics of the last ``window - 1`` iterations are moved to the current
    weights of the layer that produced the input (a first-order Taylor step in its weight and
    bias) and averaged with the current batch's:

    .. math::

        \mu_{{t-\tau}}(W_t) = \mu_{{t-\tau}} + \frac{{\partial\mu}}{{\partial W}}\cdot(W_t - W_{{t-\tau}}),\qquad
        \nu_{{t-\tau}}(W_t) = \nu_{{t-\tau}} + \frac{{\partial\nu}}{{\partial W}}\cdot(W_t - W_{{t-\tau}})

        \bar\mu = \frac1n\sum_\tau \mu_\tau,\qquad
        \bar\sigma^2 = \frac1n\sum_\tau \max(\nu_\tau, \mu_\tau^2) - \bar\mu^2,\qquad
        y = \frac{{x - \bar\mu}}{{\sqrt{{\bar\sigma^2 + \epsilon}}}} * \gamma + \beta

    with :math:`\nu = E[x^2]` and :math:`n \le` ``window`` the entries present
    (``docs/method.md``). The producer (a convolution, transposed or not, or a linear map) is read
    at every training forward from autograd's record of the input (:mod:`cbn.producer_call`): no
    converter, hook or example input is needed, and the step is taken in the weight the producer
    really used. Without a producer the layer averages uncompensated statistics and warns once;
    :func:`cbn.pairing_report` says why. Eval mode is :class:`torch.nn.{batchnorm}` with the
    running statistics (an exponential moving average of the pooled estimate).

    Args:
        num_features: :math:`C` from an expected input of size {shape}.
        eps: added to the variance inside the square root. Default: 1e-5
        momentum: factor of the running statistics' moving average; ``None`` for a cumulative
            average. Default: 0.1
        affine: learnable :math:`\gamma, \beta`. Default: ``True``
        track_running_stats: keep running statistics for eval mode. Default: ``True``
        window: iterations pooled, the current one included; 1 is BatchNorm. Default: 4
        burnin: first training iterations that run as BatchNorm. An iteration is a change of the
            weights the producer uses (:mod:`cbn.iterations`). Default: 0
        compensate: apply the Taylor step; ``False`` gives naive averaging. Default: ``True``
        bias: with ``affine``, learn :math:`\beta` too (keyword only). Default: ``True``
        process_group: pool each batch (and its statistic gradients) over this group's ranks
            before the window step (keyword only); ``window=1`` is then ``nn.SyncBatchNorm``.
            Default: ``None``
        check_shared_use: accepted for compatibility, no effect: call positions replaced the
            check (keyword only).
        differentiable_compensation: let the gradient flow through the moved past entries into
            the producer's weight and bias (our extension, the default where ``compensate``);
            ``False`` is the paper's rule (keyword only). Default: ``None``

    Shape:
        - Input: {shape}
        - Output: same shape as the input

    State: ``state_dict`` is BatchNorm's plus ``num_iterations``; the window of past entries is
    not in it (:func:`cbn.window_state_dict` for an exact resume). A norm called several times
    before one backward keeps one window per call. Bad input raises ``ValueError`` before any
    state changes; a batch whose statistics are not finite never enters the window nor the
    running statistics. Every path a training stack takes (DDP, FSDP, EMA copies, checkpointing,
    ``torch.compile``, ...) is in ``docs/reliability.md``.

    Example::

        >>> model = nn.Sequential({producer}, nn.ReLU())
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
