"""Cross-Iteration BatchNorm layers (Yao et al., CVPR 2021), drop-in replacements of nn.BatchNorm."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..functional.cross_process import all_reduce_statistic_gradients, cross_process_batch_norm
from ..functional.normalization import cross_iteration_batch_norm
from ..functional.statistic_gradients import (
    StatisticGradients,
    producer_groups,
    producer_statistic_gradients,
    statistic_shifts,
)
from ..functional.window import PastStatistics, empty_past, move_to_current_weights, pool_past
from ..producers import ProducerRegistry, ProducerTap

_UNRESOLVED, _PAIRED, _UNPAIRED = "unresolved", "paired", "unpaired"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _CrossIterationBatchNorm(_NormBase):
    r"""Base of the Cross-Iteration BatchNorm layers; see :class:`CrossIterationBatchNorm2d`."""

    _version = 2
    _window_buffers = ("window_mean", "window_var", "window_mean_shift", "window_var_shift")
    _lazy_buffers = ("window_mean_grad", "window_var_grad")

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
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1 (1 is BatchNorm), got {window!r}")
        if not isinstance(burnin, int) or burnin < 0:
            raise ValueError(f"burnin must be an integer >= 0, got {burnin!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.window = window
        self.burnin = burnin
        self.compensate = compensate
        self.process_group = process_group
        self.check_shared_use = check_shared_use
        self._iteration_shape: torch.Size | None = None
        stats_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        past = window - 1
        factory = {"device": device, "dtype": stats_dtype}
        for name in self._window_buffers:
            self.register_buffer(name, torch.zeros(past, num_features, **factory))
        self.register_buffer("window_samples", torch.zeros(past, **factory))
        self.register_buffer("window_valid", torch.zeros(past, dtype=torch.bool, device=device))
        for name in self._lazy_buffers:
            self.register_buffer(name, torch.zeros(0, **factory))
        self.register_buffer("window_next", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("num_iterations", torch.zeros((), dtype=torch.long, device=device))
        # Host-side copies of the two counters, so that the step never waits on the device.
        self._next_slot = 0
        self._iterations = 0
        self._weight_versions: tuple[int, ...] | None = None
        self._registry: ProducerRegistry | None = None
        self._producer: tuple[nn.Module, ProducerTap] | None = None
        self._pairing = _UNRESOLVED
        self._layer_name = type(self).__name__
        self._warned_mismatch = False

    # ----------------------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.reset_window()

    def reset_window(self) -> None:
        """Empty the window of past statistics and restart the iteration count (and burn-in)."""
        if not hasattr(self, "window_valid"):
            return  # called from _NormBase.__init__, before the window exists
        self.window_valid.zero_()
        self.window_next.zero_()
        self.num_iterations.zero_()
        self._next_slot = 0
        self._iterations = 0
        self._weight_versions = None

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        # Statistics stay in float32 or wider when the layer is cast to half precision.
        for name in (*self._window_buffers, "window_samples", *self._lazy_buffers):
            buffer = getattr(self, name)
            if buffer.dtype in _LOW_PRECISION:
                setattr(self, name, buffer.float())
        return module

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        window_keys = [*self._window_buffers, "window_samples", "window_valid", "window_next", "num_iterations"]
        if all(prefix + key not in state_dict for key in (*window_keys, *self._lazy_buffers)):
            # A plain BatchNorm state: its weights make any stored window stale, start empty.
            self.reset_window()
            for key in (*window_keys, *self._lazy_buffers):
                state_dict[prefix + key] = getattr(self, key)
        for key in self._lazy_buffers:
            incoming = state_dict.get(prefix + key)
            if incoming is not None and incoming.shape != getattr(self, key).shape:
                setattr(self, key, torch.zeros_like(incoming, dtype=getattr(self, key).dtype))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._next_slot = int(self.window_next)
        self._iterations = int(self.num_iterations)
        self._weight_versions = None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}, "
            f"compensate={self.compensate}"
        )

    # ----------------------------------------------------------------------------- producer
    def attach(self, registry: ProducerRegistry, name: str) -> None:
        """Let this layer look for its producer among ``registry``'s taps (done by ``convert_model``)."""
        self._registry = registry
        self._layer_name = name or self._layer_name
        self._pairing = _UNRESOLVED
        self._producer = None

    @property
    def producer(self) -> nn.Module | None:
        """The convolution or linear layer found to produce this layer's input, if any."""
        return self._producer[0] if self._producer is not None else None

    def _discover_producer(self, input: Tensor) -> None:
        found = self._registry.find(input) if self._registry is not None else None
        if found is not None and self._accepts_producer(found[0], input):
            self._producer = found
            found[1].claimed = True
            self._pairing = _PAIRED
            self._allocate_gradient_window(found[0])
            return
        self._pairing = _UNPAIRED
        if self._registry is not None:
            self._registry.unpaired.append(self._layer_name)
        else:
            warnings.warn(
                f"{self._layer_name} has no known producer and averages uncompensated statistics; "
                "convert the model with cbn.convert_model(model) to pair it with its convolution.",
                stacklevel=3,
            )

    def _accepts_producer(self, producer: nn.Module, input: Tensor) -> bool:
        if isinstance(producer, nn.Linear):
            return input.dim() == 2 and producer.out_features == self.num_features
        return producer.out_channels == self.num_features

    def _allocate_gradient_window(self, producer: nn.Module) -> None:
        if not self.compensate or self.window == 1:
            return
        past = self.window - 1
        fan_in = producer.weight[0].numel()
        shapes = {
            "window_mean_grad": (past, producer_groups(producer), fan_in),
            "window_var_grad": (past, self.num_features, fan_in),
        }
        for name, shape in shapes.items():
            buffer = getattr(self, name)
            if buffer.shape != shape:
                setattr(self, name, buffer.new_zeros(shape))
                self.window_mean_shift.zero_()
                self.window_var_shift.zero_()

    def _producer_input(self, input: Tensor) -> Tensor | None:
        if self._producer is None:
            return None
        producer_input = self._producer[1].take_input(input)
        if producer_input is None and not self._warned_mismatch:
            self._warned_mismatch = True
            warnings.warn(
                f"{self._layer_name}: this input is not the latest output of its producer "
                f"{type(self.producer).__name__}; its statistics are stored uncompensated.",
                stacklevel=3,
            )
        return producer_input

    def _trainable_producer_weights(self) -> list[Tensor]:
        if self._producer is None:
            return []
        producer = self._producer[0]
        return [p for p in (producer.weight, producer.bias) if p is not None and p.requires_grad]

    def _advance_iteration(self) -> None:
        """Count an iteration when the producer's weights changed since the last training forward.

        A frozen or unknown producer counts every training forward as an iteration.
        """
        weights = self._trainable_producer_weights()
        versions = tuple(w._version for w in weights) if weights else None
        if versions is None or versions != self._weight_versions:
            self._iterations += 1
            self.num_iterations.fill_(self._iterations)
        self._weight_versions = versions

    @property
    def _in_burnin(self) -> bool:
        return self._iterations <= self.burnin

    @property
    def _compensating(self) -> bool:
        return self.window_var_grad.numel() > 0

    # ----------------------------------------------------------------------------- maths
    def _current_shifts(self) -> tuple[Tensor, Tensor]:
        producer = self._producer[0]
        gradients = StatisticGradients(self.window_mean_grad, self.window_var_grad)
        return statistic_shifts(gradients, producer.weight, producer.bias)

    def _moved_window(self) -> tuple[Tensor, Tensor]:
        """Past entries moved to the current weights (unmoved when not compensating), ``(k-1, C)``."""
        if not self._compensating or self._producer is None:
            return self.window_mean, self.window_var
        mean_now, var_now = self._current_shifts()
        return move_to_current_weights(
            self.window_mean, self.window_var, self.window_mean_shift, self.window_var_shift, mean_now, var_now
        )

    def _past_statistics(self, input: Tensor) -> PastStatistics:
        dtype = self.window_mean.dtype
        if self.window == 1 or self._in_burnin:
            return empty_past(self.num_features, dtype, input.device)
        mean, var = self._moved_window()
        valid = self.window_valid.unsqueeze(1)
        # where, not a product: a slot left invalid by a non-finite batch may hold NaN or inf.
        mean = torch.where(valid, mean, 0.0)
        var = torch.where(valid, var, 0.0)
        return pool_past(mean, var, self.window_valid.to(dtype))

    def _push(
        self, batch_mean: Tensor, batch_var: Tensor, samples: int, producer_input: Tensor | None, output: Tensor
    ) -> None:
        """Store the current entry in the oldest slot, marked invalid if it is not finite."""
        slot = self._next_slot
        finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()
        entry = {"window_mean": batch_mean, "window_var": batch_var}
        if self._compensating:
            wants_gradients = (
                producer_input is not None
                and bool(self._trainable_producer_weights())
                and self._iterations > self.burnin - self.window + 1
            )
            if wants_gradients:
                gradients = self._entry_gradients(producer_input, output, batch_mean, samples)
                mean_shift, var_shift = statistic_shifts(gradients, self._producer[0].weight, self._producer[0].bias)
                finite &= torch.isfinite(mean_shift).all() & torch.isfinite(var_shift).all()
            else:
                # Weights that do not move need no Taylor step: zero gradients, zero shifts.
                mean_shift = var_shift = batch_mean.new_zeros(self.num_features)
                gradients = StatisticGradients(mean_shift.new_zeros(()), var_shift.new_zeros(()))
            entry.update(
                window_mean_shift=mean_shift,
                window_var_shift=var_shift,
                window_mean_grad=gradients.mean,
                window_var_grad=gradients.var,
            )
        for name, value in entry.items():
            getattr(self, name)[slot].copy_(torch.where(finite, value, 0.0))
        self.window_samples[slot].fill_(samples)
        self.window_valid[slot].copy_(finite)
        self._next_slot = (slot + 1) % (self.window - 1)
        self.window_next.fill_(self._next_slot)

    def _update_running_stats(self, mean: Tensor, var: Tensor, samples: int, pooled: bool) -> None:
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        # samples is an int, or a 0-dim device tensor when pooled over processes (no host sync).
        pooled_samples = torch.as_tensor(samples, dtype=var.dtype, device=var.device)
        if pooled:
            pooled_samples = pooled_samples + (self.window_samples * self.window_valid).sum()
        unbiased_var = var * pooled_samples / (pooled_samples - 1)
        finite = torch.isfinite(mean).all() & torch.isfinite(unbiased_var).all()
        new_mean = torch.lerp(self.running_mean, mean.to(self.running_mean.dtype), factor)
        new_var = torch.lerp(self.running_var, unbiased_var.to(self.running_var.dtype), factor)
        self.running_mean.copy_(torch.where(finite, new_mean, self.running_mean))
        self.running_var.copy_(torch.where(finite, new_var, self.running_var))

    # ----------------------------------------------------------------------------- forward
    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
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
        if torch.is_autocast_enabled(input.device.type):
            # Statistics, windows and Taylor terms stay in float32: autocast would run the
            # matmuls of the statistic shifts in half precision.
            with torch.autocast(input.device.type, enabled=False):
                return self._training_forward(input)
        return self._training_forward(input)

    def _training_forward(self, input: Tensor) -> Tensor:
        if self._cross_process or torch.compiler.is_compiling():
            return self._staged_training_forward(input)
        if self._pairing == _UNRESOLVED:
            self._discover_producer(input)
        producer_input = self._producer_input(input)
        self._check_one_input_per_iteration(input)
        samples = input.numel() // self.num_features
        self._advance_iteration()
        pooled = self.window > 1 and not self._in_burnin
        if samples <= 1 and not (pooled and bool(self.window_valid.any())):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        with torch.no_grad():
            past = self._past_statistics(input)
        output, stats = cross_iteration_batch_norm(
            input, past, self.weight, self.bias, self.eps, self.window_mean.dtype
        )
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                self._update_running_stats(stats.mean, stats.var, samples, pooled)
            if self.window > 1:
                self._push(stats.batch_mean, stats.batch_var, samples, producer_input, input)
        return output

    # ----------------------------------------------------------------------------- production
    def _check_one_input_per_iteration(self, input: Tensor) -> None:
        """Refuse a second input of another spatial size within one iteration (a shared norm).

        Several training forwards with unchanged producer weights are one iteration (gradient
        accumulation) and each stores an entry. A norm applied to several different inputs per
        step (a detection head shared across pyramid levels) would mix their statistics in one
        window; different spatial sizes within an iteration are the sign of it.
        """
        weights = self._trainable_producer_weights()
        versions = tuple(w._version for w in weights) if weights else None
        same_iteration = versions is not None and versions == self._weight_versions
        shape = input.shape[2:]
        if self.check_shared_use and same_iteration and self._iteration_shape not in (None, shape):
            raise ValueError(
                f"{self._layer_name} got inputs of spatial sizes {tuple(self._iteration_shape)} and "
                f"{tuple(shape)} in one iteration (unchanged producer weights). One Cross-Iteration "
                "BatchNorm applied to several inputs, e.g. the levels of a feature pyramid, would mix "
                "their statistics in one window: give each input its own norm layer (the producer may "
                "stay shared). For gradient accumulation over inputs of varying size, construct the "
                "layer (or convert_model) with check_shared_use=False."
            )
        self._iteration_shape = shape

    @property
    def _cross_process(self) -> bool:
        """Pool the batch over ``process_group``: set, initialized and with more than one rank."""
        return (
            self.process_group is not None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _staged_training_forward(self, input: Tensor) -> Tensor:
        """The training forward in three stages: bookkeeping, normalization, recording.

        Used when the batch is pooled over the ranks of ``process_group`` and under
        ``torch.compile``. The bookkeeping and recording stages read and write Python state
        (producer taps, host counters, weight versions) and run eagerly
        (``torch.compiler.disable``); the normalization between them is compiled.

        With a process group, every rank computes the same pooled statistics and statistic
        gradients, so every rank stores the same entry and keeps the same window: ``P`` ranks of
        ``B`` examples with window ``k`` estimate from ``P * B * k`` examples. With ``window=1``
        this is ``nn.SyncBatchNorm``.
        """
        past, producer_input, pooled = self._prepare_step(input)
        if self._cross_process:
            output, stats, samples = cross_process_batch_norm(
                input, past, self.weight, self.bias, self.eps, self.window_mean.dtype, self.process_group
            )
        else:
            output, stats = cross_iteration_batch_norm(
                input, past, self.weight, self.bias, self.eps, self.window_mean.dtype
            )
            samples = input.numel() // self.num_features
        self._record_step(stats, samples, pooled, producer_input, input)
        return output

    @torch.compiler.disable
    def _prepare_step(self, input: Tensor) -> tuple[PastStatistics, Tensor | None, bool]:
        """Producer pairing, iteration count and the past entries moved to the current weights."""
        if self._pairing == _UNRESOLVED:
            self._discover_producer(input)
        producer_input = self._producer_input(input)
        self._check_one_input_per_iteration(input)
        self._advance_iteration()
        pooled = self.window > 1 and not self._in_burnin
        samples = input.numel() // self.num_features
        if not self._cross_process and samples <= 1 and not (pooled and bool(self.window_valid.any())):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        with torch.no_grad():
            past = self._past_statistics(input)
        return past, producer_input, pooled

    @torch.compiler.disable
    @torch.no_grad()
    def _record_step(self, stats, samples: int | Tensor, pooled: bool, producer_input, input: Tensor) -> None:
        """Running statistics and the push of the current entry into the window."""
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            self._update_running_stats(stats.mean, stats.var, samples, pooled)
        if self.window > 1:
            self._push(stats.batch_mean, stats.batch_var, samples, producer_input, input)

    def _entry_gradients(
        self, producer_input: Tensor, output: Tensor, batch_mean: Tensor, samples: int | Tensor
    ) -> StatisticGradients:
        """Statistic gradients of the current entry, pooled over ranks when the batch is."""
        dtype = self.window_mean.dtype
        producer_input, output = producer_input.detach().to(dtype), output.detach().to(dtype)
        gradients = producer_statistic_gradients(self._producer[0], producer_input, output, batch_mean)
        if isinstance(samples, Tensor):  # pooled over processes: batch_mean is the global mean
            local_samples = output.numel() // self.num_features
            gradients = all_reduce_statistic_gradients(gradients, local_samples, samples, self.process_group)
        return gradients

    @torch.no_grad()
    def window_statistics(self) -> dict[str, Tensor]:
        """Stored past entries, newest first, raw and moved to the producer's current weights.

        Returns a dict of ``(n_past, C)`` tensors ``mean``, ``var``, ``mean_compensated``,
        ``var_compensated`` over the valid entries (the window is not modified).
        """
        if self.window == 1:
            empty = self.window_mean.new_zeros(0, self.num_features)
            return dict(mean=empty, var=empty, mean_compensated=empty, var_compensated=empty)
        past = self.window - 1
        order = [(self._next_slot - offset) % past for offset in range(1, past + 1)]
        order = [slot for slot in order if bool(self.window_valid[slot])]
        moved_mean, moved_var = self._moved_window()
        return dict(
            mean=self.window_mean[order],
            var=self.window_var[order],
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
    through the current batch's statistics only. The derivatives are computed in closed form
    (one extra weight-gradient convolution per step); no weight copy is kept, and the window
    lives in buffers, so ``state_dict`` resumes training exactly. Eval mode is
    :class:`torch.nn.{batchnorm}` with the running statistics, which are an exponential moving
    average (``momentum``; ``None`` for a cumulative average) of the pooled estimate with the
    variance unbiased over all pooled samples.

    The producer (``nn.Conv1d/2d/3d`` or ``nn.Linear``) is found by :func:`cbn.convert_model`,
    which also replaces existing BatchNorm layers. A layer with no producer averages
    uncompensated statistics ("naive" CBN) and warns once.

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
            An iteration is a change of the producer's weights (an optimizer step), so several
            forwards with unchanged weights (gradient accumulation) are one iteration; with no
            trainable producer, each training forward is one. Default: 0
        compensate: apply the Taylor step; ``False`` gives naive cross-iteration averaging.
            Default: ``True``
        process_group: pool each batch's statistics (and their weight gradients) over the ranks
            of this ``torch.distributed`` group before the window step (keyword only), so that
            ``P`` ranks of ``B`` examples with window ``k`` estimate from ``P * B * k`` examples;
            with ``window=1`` this is ``nn.SyncBatchNorm``. ``None``: each rank uses its own
            batches, like ``nn.BatchNorm`` under DDP. Default: ``None``
        check_shared_use: raise ``ValueError`` when one iteration's training forwards get inputs
            of different spatial sizes, the sign of one norm applied to several inputs (e.g. the
            levels of a feature pyramid), whose statistics would be mixed in one window
            (keyword only). ``False`` for gradient accumulation over variable-size inputs.
            Default: ``True``

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
        - ``torch.compile``: the bookkeeping (producer taps, counters, window push) runs eagerly
          via ``torch.compiler.disable``; the normalization is compiled. Two graph breaks per layer.
        - Several inputs per iteration: see ``check_shared_use``; gradient accumulation with
          unchanged weights pools the micro-batches (one entry each) as one iteration.

    Example::

        >>> model = cbn.convert_model(nn.Sequential({producer}, nn.ReLU()))
        >>> out = model(torch.randn({example}))
"""


class CrossIterationBatchNorm1d(_CrossIterationBatchNorm):
    __doc__ = _DOC_TEMPLATE.format(
        rank="2D or 3D",
        batchnorm="BatchNorm1d",
        shape=":math:`(N, C)` or :math:`(N, C, L)`",
        name="CrossIterationBatchNorm1d",
        producer="nn.Linear(8, 16), cbn.CrossIterationBatchNorm1d(16)",
        example="2, 8",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D (N, C) or 3D (N, C, L) input, got {input.dim()}D input")


class CrossIterationBatchNorm2d(_CrossIterationBatchNorm):
    __doc__ = _DOC_TEMPLATE.format(
        rank="4D",
        batchnorm="BatchNorm2d",
        shape=":math:`(N, C, H, W)`",
        name="CrossIterationBatchNorm2d",
        producer="nn.Conv2d(3, 16, 3), cbn.CrossIterationBatchNorm2d(16)",
        example="2, 3, 8, 8",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D (N, C, H, W) input, got {input.dim()}D input")


class CrossIterationBatchNorm3d(_CrossIterationBatchNorm):
    __doc__ = _DOC_TEMPLATE.format(
        rank="5D",
        batchnorm="BatchNorm3d",
        shape=":math:`(N, C, D, H, W)`",
        name="CrossIterationBatchNorm3d",
        producer="nn.Conv3d(3, 16, 3), cbn.CrossIterationBatchNorm3d(16)",
        example="2, 3, 6, 8, 8",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D (N, C, D, H, W) input, got {input.dim()}D input")


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
