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
from torch import Tensor, nn

from .functional.statistic_gradients import PRODUCER_TYPES


class ProducerTap:
    """Forward hook on a producer: its latest output (weakly) and, while wanted, its input."""

    def __init__(self) -> None:
        self.keep_input = True  # until discovery is over, every producer is a candidate
        self.claimed = False
        self._output: weakref.ref | None = None
        self._input: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.compiler.is_compiling():
            return self._record_outside_graph(module, args, output)
        return self._record(module, args, output)

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._output = weakref.ref(output) if isinstance(output, Tensor) else None
        self._input = args[0] if self.keep_input and module.training else None

    # Under torch.compile the tap runs eagerly: it keeps a weak reference to the very tensor object
    # the norm will receive, which only exists outside a graph.
    _record_outside_graph = torch.compiler.disable(_record)

    def produced(self, tensor: Tensor) -> bool:
        return self._output is not None and self._output() is tensor

    def take_input(self, output: Tensor) -> Tensor | None:
        """The input behind ``output`` if it is this producer's latest output, released after reading."""
        producer_input = self._input if self.produced(output) else None
        self._input = None
        return producer_input

    def __getstate__(self) -> dict:
        # Tensors of the last call are transient: copies and pickles start without them.
        return {"keep_input": self.keep_input, "claimed": self.claimed, "_output": None, "_input": None}


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
                tap = ProducerTap()
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
