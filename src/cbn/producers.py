"""Finding, at run time, the convolution or linear layer that directly produces a norm's input.

``convert_model`` puts a :class:`ProducerTap` forward hook on every ``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear`` of a model. A tap remembers its latest output
(weakly) and, while it may be needed, its latest input. At its first training forward a
Cross-Iteration BatchNorm layer asks the shared
:class:`ProducerRegistry` which tap produced the very tensor it received: that layer is its
producer. Nothing is traced and no example input is needed, so blocks with custom ``forward``
code pair as well as ``nn.Sequential`` ones. After the model's first training forward, the
registry's :class:`DiscoveryReport` (a forward hook on the model) releases the taps no norm claimed
and emits one warning naming the norms left without a producer.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .functional.statistic_gradients import _CONVOLUTIONS, PRODUCER_TYPES, ConvolutionCall

_STOCK_FORWARDS = {cls.forward for cls in PRODUCER_TYPES}


class ProducerTap:
    """Forward hook on a producer: its latest output (weakly) and, while wanted, its input."""

    def __init__(self, channel_last: bool = False) -> None:
        self.channel_last = channel_last  # a linear layer: channels on the last axis of its output
        self.keep_input = True  # until discovery is over, every producer is a candidate
        self.claimed = False
        self._output: weakref.ref | None = None
        self._output_version = 0  # the output's version counter when the producer returned it
        # When the output is itself a view (a linear layer's (B, N, C) output): what it is a view
        # of, and its shape, contiguity and address, since a view taken of it may outlive it.
        self._output_root: weakref.ref | None = None
        self._output_geometry: tuple | None = None
        self._input: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.compiler.is_compiling():
            if self.claimed:
                # Paired: the norm reads the input inside the graph (no weak reference there).
                self._input = args[0] if module.training else None
            elif self.keep_input:  # discovery is not over: record outside the graph
                self._record_outside_graph(module, args, output)
            return None
        return self._record(module, args, output)

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._remember_output(output)
        self._input = args[0] if self.keep_input and module.training else None

    def _remember_output(self, output: object) -> None:
        if isinstance(output, Tensor):
            # Inference tensors have no version counter (and are never written in place by autograd code).
            self._output = weakref.ref(output)
            self._output_version = None if output.is_inference() else output._version
            root = output._base
            if root is not None:
                self._output_root = weakref.ref(root)
                self._output_geometry = (output.shape, output.is_contiguous(), output.data_ptr())
            else:
                self._output_root = None
        else:
            self._output = None

    # Under torch.compile the tap runs eagerly: it keeps a weak reference to the very tensor object
    # the norm will receive, which only exists outside a graph.
    _record_outside_graph = torch.compiler.disable(_record)

    def produced(self, tensor: Tensor) -> bool:
        return self.output_of(tensor) is not None

    def output_of(self, tensor: Tensor) -> Tensor | None:
        """This producer's latest output, if ``tensor`` is it or a view of it whose channels hold
        the same values (a reshape that keeps the channel axis, e.g. ``linear(x).flatten(0, 1)``
        for a ``BatchNorm1d``); else ``None``."""
        output = self._output() if self._output is not None else None
        if output is not None and tensor is output:
            return output
        base = tensor._base
        if base is None:
            return None
        if output is not None and base is output:
            geometry = (output.shape, output.is_contiguous(), output.data_ptr())
        elif self._output_root is not None and base is self._output_root():
            # Views of a view share its root, and the output itself may be gone by now.
            geometry = self._output_geometry
        else:
            return None
        if not keeps_channel_values(tensor, *geometry, self.channel_last):
            return None
        return output if output is not None else tensor.view(geometry[0])

    def modified_in_place(self, tensor: Tensor) -> bool:
        """Whether ``tensor``, this producer's latest output (or a view of it), was written in
        place since the producer returned it (a view shares its base's version counter)."""
        return self.produced(tensor) and self._output_version is not None and tensor._version != self._output_version

    def take_input(self, output: Tensor) -> Tensor | None:
        """The input behind ``output`` if it is this producer's latest output, released after reading."""
        producer_input = self._input if self.produced(output) and not self.modified_in_place(output) else None
        self._input = None
        if producer_input is not None and self.channel_last and producer_input.dim() > 2:
            producer_input = producer_input.reshape(-1, producer_input.shape[-1])  # rows of an (M, C) view
        return producer_input

    def __getstate__(self) -> dict:
        # Tensors of the last call are transient: copies and pickles start without them.
        return {"channel_last": self.channel_last, "keep_input": self.keep_input, "claimed": self.claimed,
                "_output": None, "_output_version": 0, "_output_root": None, "_output_geometry": None,
                "_input": None}


_CONVOLUTION_FUNCTIONS = frozenset((F.conv1d, F.conv2d, F.conv3d))
_CALL_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CALL_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def keeps_channel_values(
    view: Tensor, output_shape: torch.Size, output_contiguous: bool, output_address: int, channel_last: bool
) -> bool:
    """Whether each channel of ``view`` (its dim 1) holds exactly the values of the same channel
    of a producer's output it is a view of (given by shape, contiguity and address): both
    contiguous over the same memory, and either ``(N, C, *)`` with the same ``N`` and ``C``
    (spatial dims reshaped), or, for an output with channels last (a linear layer's
    ``(..., C)``), the ``(M, C)`` matrix of its rows."""
    if not (view.is_contiguous() and output_contiguous) or view.dim() < 2:
        return False
    if view.numel() != output_shape.numel() or view.data_ptr() != output_address:
        return False
    if channel_last:
        return view.dim() == 2 and view.shape[1] == output_shape[-1]
    return len(output_shape) >= 2 and view.shape[:2] == output_shape[:2]


def has_custom_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class overrides the ``forward`` of the torch producer class it extends.

    Parametrized modules (``torch.nn.utils.parametrize``) keep the stock ``forward``: their
    ``weight`` attribute already is the effective weight.
    """
    return type(module).forward not in _STOCK_FORWARDS


def weight_set_at_call(module: nn.Module) -> bool:
    """Whether a forward pre-hook of ``module`` may set its ``weight`` at each call (the
    pre-``parametrize`` ``weight_norm`` and ``spectral_norm``): the weight a call uses is then
    known only once the module has run."""
    return any(not isinstance(getattr(hook, "__self__", None), CapturingTap)
               for hook in module._forward_pre_hooks.values())


def _parametrized(module: nn.Module) -> bool:
    """A parametrized weight is computed at each read, with the parametrization's side effects
    (``spectral_norm`` runs a power iteration per read in training): the weight a forward used
    is taken from its ``F.convNd`` call, never read again."""
    return parametrize.is_parametrized(module, "weight")


class _ConvolutionCapture(TorchFunctionMode):
    """Records every ``F.conv1d/2d/3d`` call made while active, with its result."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple, dict, Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _CONVOLUTION_FUNCTIONS:
            self.calls.append((args, kwargs, result))
        return result


def _as_call(args: tuple, kwargs: dict) -> tuple[Tensor, ConvolutionCall]:
    bound = {**_CALL_DEFAULTS, **dict(zip(_CALL_ARGUMENTS, args)), **kwargs}
    dims = bound["weight"].dim() - 2

    def per_dim(value):
        return value if isinstance(value, str) else tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

    call = ConvolutionCall(bound["weight"], bound["bias"], per_dim(bound["stride"]), per_dim(bound["padding"]),
                           per_dim(bound["dilation"]), int(bound["groups"]))
    return bound["input"], call


class CapturingTap(ProducerTap):
    """Tap of a convolution whose ``forward`` is custom: records the ``F.convNd`` call it made.

    The module may pad its input or transform its weight (weight standardization) before the
    call; the call's own input and weight are what the output's statistics depend on. The
    capture (a ``TorchFunctionMode`` around the module's forward) runs only in training and while
    the tap may be needed. ``failure`` says why a forward could not be described by one call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.call: ConvolutionCall | None = None
        self.failure = ""
        self._capture: _ConvolutionCapture | None = None

    def enter(self, module: nn.Module, args: tuple) -> None:
        if self.keep_input and module.training and not torch.compiler.is_compiling():
            self._capture = _ConvolutionCapture()
            self._capture.__enter__()

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        capture, self._capture = self._capture, None
        self._remember_output(output)
        self._input, self.call = None, None
        if capture is None:
            return
        capture.__exit__(None, None, None)
        found = [(a, k) for a, k, result in capture.calls if result is output]
        if len(found) != 1:
            self.failure = (f"custom forward of {type(module).__name__} does not return the result of one "
                            "F.conv1d/2d/3d call")
            return
        self._input, self.call = _as_call(*found[0])
        self.failure = ""

    _record_outside_graph = torch.compiler.disable(_record)

    def take_input(self, output: Tensor) -> Tensor | None:
        producer_input = super().take_input(output)
        if producer_input is None:
            self.call = None
        return producer_input

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "call": None, "failure": self.failure, "_capture": None}


class ProducerRegistry:
    """The taps of one converted model, shared by its Cross-Iteration BatchNorm layers."""

    def __init__(self) -> None:
        self.taps: list[tuple[nn.Module, ProducerTap]] = []
        self.unpaired: list[str] = []
        self.discovering = False
        self.reported = False

    @classmethod
    def install(cls, model: nn.Module) -> "ProducerRegistry":
        """Tap every producer of ``model`` (once) and hook the discovery report on ``model``."""
        for hook in model._forward_hooks.values():
            if isinstance(hook, DiscoveryReport):
                registry = hook.registry
                break
        else:
            registry = cls()
            model.register_forward_hook(DiscoveryReport(registry))
        tapped = {id(module) for module, _ in registry.taps}
        for module in model.modules():
            if isinstance(module, PRODUCER_TYPES) and id(module) not in tapped:
                if isinstance(module, _CONVOLUTIONS) and (has_custom_forward(module) or _parametrized(module)):
                    tap = CapturingTap()
                    module.register_forward_pre_hook(tap.enter)
                    # always_call: the capture mode is left even when the forward raises
                    module.register_forward_hook(tap, always_call=True)
                else:
                    tap = ProducerTap(channel_last=isinstance(module, nn.Linear))
                    module.register_forward_hook(tap)
                registry.taps.append((module, tap))
        return registry

    def find(self, tensor: Tensor) -> tuple[nn.Module, ProducerTap] | None:
        self.discovering = True
        for module, tap in self.taps:
            if tap.produced(tensor):
                return module, tap
        return None

    def finish_discovery(self) -> None:
        if not self.discovering or self.reported:
            return
        self.reported = True
        for _, tap in self.taps:
            tap.keep_input = tap.claimed
            if not tap.claimed:
                tap._input = None
        if self.unpaired:
            warnings.warn(
                f"cbn: {', '.join(self.unpaired)} average uncompensated statistics (naive "
                "cross-iteration averaging); cbn.pairing_report(model) lists every norm layer.",
                stacklevel=3,
            )


class DiscoveryReport:
    """Forward hook on a converted model that closes producer discovery after its first training pass."""

    def __init__(self, registry: ProducerRegistry) -> None:
        self.registry = registry

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        self.registry.finish_discovery()


def remove_hooks(model: nn.Module) -> None:
    """Remove every tap and discovery report that ``convert_model`` put on ``model``."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, (ProducerTap, DiscoveryReport)):
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(getattr(hook, "__self__", None), CapturingTap):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
