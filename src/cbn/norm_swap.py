"""Swapping norm layers for others that share their parameters and running statistics.

Every converter of the package sits on this module: :func:`cbn.convert_model` and
:func:`cbn.revert_model`, :func:`cbn.convert_batchrenorm`, :func:`cbn.convert_sync_batchnorm`.
A swap replaces each submodule of given types by ``factory(submodule)``; the new layer takes the
very ``Parameter`` and buffer objects of the old one (no copy, as
``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so an optimizer built before the swap keeps
training the same tensors. What the old layer was (its exact class and its attributes other than
tensors and submodules) can be remembered by the new one (:class:`OriginalNorm`), so that swapping
back rebuilds the very same class, attributes and hooks around the shared tensors.

A ``_BatchNorm`` of a class no converter knows is left as it is, and named in one warning
(:func:`warn_unconverted`); an uninitialized lazy norm (``nn.LazyBatchNorm2d`` before its first
forward) is refused with a ``ValueError`` before anything changes (:func:`refuse_uninitialized`).
This module imports nothing else of the package, so ``cbn.layers`` can use it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin

# What _NormBase.__init__ sets: the swapped layer's values win over the remembered ones on the way
# back (a user may change ``momentum`` of a converted layer).
NORM_ATTRIBUTES = ("training", "num_features", "eps", "momentum", "affine", "track_running_stats")
_TENSORS_AND_CHILDREN = ("_parameters", "_buffers", "_modules")
# LazyModuleMixin's handles of hooks bound to the lazy object itself.
_LAZY_HANDLES = ("_load_hook", "_initialize_hook")


def replace_modules(
    module: nn.Module,
    factory: Callable[[nn.Module], nn.Module],
    types: tuple[type, ...] = (_BatchNorm,),
) -> nn.Module:
    """Replace every submodule of one of ``types`` by ``factory(submodule)``, recursively.

    A replaced module's children are not visited (the factory decides what becomes of them).
    Returns ``module`` itself, or its replacement when ``module`` is of one of ``types``.

    Example::

        >>> model = replace_modules(model, lambda bn: nn.GroupNorm(8, bn.num_features))
    """
    if isinstance(module, types):
        return factory(module)
    for name, child in module.named_children():
        replacement = replace_modules(child, factory, types)
        if replacement is not child:
            module.add_module(name, replacement)
    return module


def share_norm_state(source: _NormBase, target: _NormBase) -> _NormBase:
    """Give ``target`` the parameters and running-statistics buffers of ``source`` (no copy).

    ``weight``/``bias`` are shared when ``source.affine`` (a ``bias=False`` norm shares its
    ``None``), ``running_mean``/``running_var``/``num_batches_tracked`` when both track running
    statistics; ``target`` takes ``source``'s train/eval mode. Returns ``target``.
    """
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    if source.track_running_stats and target.track_running_stats:
        target.running_mean = source.running_mean
        target.running_var = source.running_var
        target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    return target


def norm_arguments(norm: _NormBase) -> dict:
    """The constructor arguments of ``norm`` that every norm class takes, ``num_features`` aside.

    ``eps, momentum, affine, track_running_stats``, the ``device``/``dtype`` of its tensors, and
    ``bias=False`` for an affine norm without bias (only then: the keyword is recent in torch).
    """
    reference = norm.weight if norm.affine else norm.running_mean
    kwargs = dict(eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                  track_running_stats=norm.track_running_stats)
    if reference is not None:
        kwargs.update(device=reference.device, dtype=reference.dtype)
    if norm.affine and norm.bias is None:
        kwargs.update(bias=False)
    return kwargs


def effective_class(norm: nn.Module) -> type:
    """The class ``norm`` behaves as: an initialized lazy norm's ``cls_to_become``, else its class.

    ``nn.LazyBatchNorm2d`` turns into ``nn.BatchNorm2d`` at its first forward; loaded from a state
    dict it is initialized but keeps its lazy class until then.
    """
    if isinstance(norm, LazyModuleMixin) and getattr(norm, "cls_to_become", None) is not None:
        return norm.cls_to_become
    return type(norm)


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, e.g. ``timm.layers.norm_act.BatchNormAct2d``."""
    return f"{cls.__module__}.{cls.__qualname__}"


class OriginalNorm:
    """What a swapped-out norm was, minus its tensors and children: enough to rebuild it exactly.

    Holds the class and the instance attributes (hyper-parameters, train flag, hooks, any custom
    attribute such as ``qconfig``) and the names, in order, of its parameters, buffers
    and children. :meth:`rebuild` makes a new instance of that class around the tensors and
    children the swapped-in layer holds then (the same objects, moved or trained since), with the
    layer's current :data:`NORM_ATTRIBUTES`. Plain data: it survives ``copy.deepcopy`` and
    ``pickle`` with the layer that keeps it, and adds nothing to ``state_dict``.
    """

    def __init__(self, norm: nn.Module) -> None:
        lazy = isinstance(norm, LazyModuleMixin)
        self.cls = effective_class(norm)
        attributes = {}
        for key, value in vars(norm).items():
            if key in _TENSORS_AND_CHILDREN or (lazy and key in _LAZY_HANDLES):
                continue
            if isinstance(value, dict):  # hook dicts and the like: own copies, minus hooks bound to ``norm``
                value = type(value)((k, v) for k, v in value.items() if not _bound_to(v, norm))
            elif isinstance(value, set):
                value = set(value)
            attributes[key] = value
        self.attributes = attributes
        self.parameters = list(norm._parameters)
        self.buffers = list(norm._buffers)
        self.children = list(norm._modules)

    def rebuild(self, layer: nn.Module) -> nn.Module:
        """A new instance of the remembered class, holding ``layer``'s tensors and children."""
        module = self.cls.__new__(self.cls)
        state = {}
        for key, value in self.attributes.items():
            if isinstance(value, dict):
                value = type(value)(value)
            elif isinstance(value, set):
                value = set(value)
            state[key] = value
        state.update({key: getattr(layer, key) for key in NORM_ATTRIBUTES if key in vars(layer)})
        state["_parameters"] = {name: layer._parameters.get(name) for name in self.parameters}
        state["_buffers"] = {name: layer._buffers.get(name) for name in self.buffers}
        state["_modules"] = {name: layer._modules[name] for name in self.children}
        module.__dict__.update(state)
        return module


def _bound_to(hook: object, module: nn.Module) -> bool:
    """Whether ``hook`` is a method of ``module`` (also wrapped, as load-state-dict hooks are)."""
    return getattr(hook, "__self__", None) is module or getattr(getattr(hook, "hook", None), "__self__", None) is module


_ORIGINAL = "_original_norm"


def remember_original(norm: nn.Module, layer: nn.Module) -> nn.Module:
    """Let ``layer`` (the replacement of ``norm``) keep :class:`OriginalNorm` ``(norm)``; returns ``layer``.

    Kept in the instance dictionary, outside ``nn.Module``'s registries: not a submodule, not
    in ``state_dict``, copied by ``deepcopy`` and ``pickle``.
    """
    layer.__dict__[_ORIGINAL] = OriginalNorm(norm)
    return layer


def original_of(layer: nn.Module) -> OriginalNorm | None:
    """The :class:`OriginalNorm` a swapped-in layer keeps, or ``None`` (built directly)."""
    return layer.__dict__.get(_ORIGINAL)


def refuse_uninitialized(model: nn.Module, types: tuple[type, ...] = (_BatchNorm,), caller: str = "cbn") -> None:
    """Raise ``ValueError`` naming every lazy norm of ``model`` not initialized yet.

    Its number of channels, hence the size of anything that replaces it, is unknown until its
    first forward; like ``DistributedDataParallel`` with uninitialized parameters, the fix is one
    forward of the model (e.g. ``model(example_input)``) before the conversion.
    """
    lazy = [
        f"{name or '(root)'} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, types) and isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
    ]
    if lazy:
        raise ValueError(
            f"{caller}: {', '.join(lazy)} not initialized yet (lazy norms learn their number of "
            "channels at their first forward). Run one forward of the model, e.g. model(example_input), "
            "before converting it."
        )


def warn_unconverted(names: Mapping[type, list[str]], caller: str, fix: str, stacklevel: int = 3) -> None:
    """One warning naming each class of ``names`` (with its Python module) and its layers.

    ``stacklevel`` 3 points at the caller of the function that calls this one.
    """
    if not names:
        return
    parts = []
    for cls, layers in names.items():
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        count = f"{len(layers)} layer" + ("s" if len(layers) > 1 else "")
        parts.append(f"{qualified_name(cls)} ({count}: {shown})")
    warnings.warn(f"{caller} left these norm layers as they are: {'; '.join(parts)}. {fix}", stacklevel=stacklevel)


def swap_norms(
    model: nn.Module,
    factories: Mapping[type, Callable[[nn.Module], nn.Module]],
    types: tuple[type, ...] = (_BatchNorm,),
    caller: str = "cbn",
    fix: str = "",
    keep: tuple[type, ...] = (),
) -> nn.Module:
    """Replace each submodule of ``types`` whose (effective) class has a factory by its result.

    Lazy norms not initialized yet are refused first (``ValueError``, nothing changed). A
    submodule of ``types`` whose class has no factory is left as it is, and one warning names
    all of them (class, Python module, layer names) followed by ``fix``; instances of ``keep``
    (e.g. the classes being swapped in) are left silently.

    Args:
        model: any ``nn.Module``.
        factories: exact class (``nn.BatchNorm2d``, not its subclasses) to a function of the old
            layer returning the new one.
        types: the classes to look at (``_BatchNorm``: every BatchNorm kind).
        caller: the function named in the error and warning.
        fix: a sentence the warning ends with.
        keep: classes of ``types`` to leave as they are without a warning.

    Returns:
        the root: ``model``, or its replacement if ``model`` itself is swapped.

    Example::

        >>> model = swap_norms(model, {nn.BatchNorm2d: lambda bn: nn.GroupNorm(1, bn.num_features)})
    """
    refuse_uninitialized(model, types, caller)
    unknown: dict[type, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and effective_class(module) not in factories and not isinstance(module, keep):
            unknown.setdefault(type(module), []).append(name or "(root)")
    root = replace_modules(model, lambda module: factories.get(effective_class(module), _keep)(module), types)
    warn_unconverted(unknown, caller, fix, stacklevel=4)  # the user's call of the converter
    return root


def _keep(module: nn.Module) -> nn.Module:
    return module


def layer_factory(
    layer_class: type, remember: bool = False, children: Iterable[str] = (), **layer_kwargs
) -> Callable[[_NormBase], nn.Module]:
    """A factory for :func:`swap_norms`: ``layer_class(num_features, ...)`` sharing the old state.

    The new layer gets the old one's :func:`norm_arguments` (overridden by ``layer_kwargs``),
    its parameters and running statistics (:func:`share_norm_state`), the old layer's children
    named in ``children`` (the same module objects, e.g. ``act``), and, with ``remember``, an
    :class:`OriginalNorm` to be swapped back with.
    """

    def make(norm: _NormBase) -> nn.Module:
        layer = layer_class(norm.num_features, **{**norm_arguments(norm), **layer_kwargs})
        for name in children:
            if name in norm._modules:
                layer.add_module(name, norm._modules[name])
        share_norm_state(norm, layer)
        return remember_original(norm, layer) if remember else layer

    return make
