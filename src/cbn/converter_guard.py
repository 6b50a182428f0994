"""No silent clobbering: a converted model refuses to train once another converter replaced its CBN layers.

Cross-Iteration BatchNorm layers are ``torch.nn.modules.batchnorm._BatchNorm`` on purpose (what
recognises BatchNorm, such as ``update_bn``, fusers and weight-decay filters, recognises them).
The converters frameworks run when a user goes multi-GPU test that class too and replace every
such layer: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (called by Lightning's
``Trainer(sync_batchnorm=True)`` and mmengine's ``sync_bn="torch"``), mmengine's
``convert_sync_batchnorm``, timm's ``convert_sync_batchnorm`` (``--sync-bn``, which also drops the
activation of a norm + act layer). The model then trains with SyncBatchNorm while its user
believes it is CBN.

:func:`install` (called by :func:`cbn.convert_model`) puts a :class:`ConverterGuard` on the model:
at each training forward it checks, for every CBN layer, that its parent still holds it (a dict
lookup per layer, no walk of the model), and raises ``RuntimeError`` naming the class that took
its place, the converter that makes that class, and the right order. A layer replaced by another
CBN layer or by a module that is not a BatchNorm (model surgery) is left to the user.

Why a check at the forward rather than wrappers around the converters: it needs no change to any
framework (their converters are also imported by name into their trainers, where a wrapper would
not reach), it catches converters nobody listed, and it costs nothing until a model is trained.

Example::

    >>> model = cbn.convert_model(net)
    >>> model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    >>> model(x)   # RuntimeError: ... replaced by torch.nn.SyncBatchNorm ...
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers.cross_iteration_batchnorm import CrossIterationBatchNormBase

# Both make a torch.nn.SyncBatchNorm of a CBN layer (timm's makes SyncBatchNormAct only of its own
# BatchNormAct2d), and both move the old layer's children (drop, act) under it, where
# SyncBatchNorm's forward never calls them.
_TORCH = ("torch.nn.SyncBatchNorm.convert_sync_batchnorm (also run by Lightning's Trainer(sync_batchnorm=True), "
          "mmengine's convert_sync_batchnorm and its Runner's sync_bn) or timm.layers.convert_sync_batchnorm "
          "(timm's train.py --sync-bn)")
# The class a converter puts in place of a BatchNorm -> who does that.
CONVERTERS = {
    "torch.nn.modules.batchnorm.SyncBatchNorm": _TORCH,
    "mmcv.ops.sync_bn.SyncBatchNorm": "mmengine.model.convert_sync_batchnorm(..., implementation='mmcv')",
    "mmengine.model.utils._BatchNormXd": "mmengine.model.revert_sync_batchnorm",
    "pytorch_lightning.plugins.layer_sync._BatchNormXd": "Lightning's TorchSyncBatchNorm.revert",
    "lightning.pytorch.plugins.layer_sync._BatchNormXd": "Lightning's TorchSyncBatchNorm.revert",
}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ConverterGuard:
    """A forward pre-hook: raise if a CBN layer of the model was replaced by another BatchNorm.

    Keeps ``(parent, attribute name, layer, qualified name)`` per layer; ``copy.deepcopy`` and ``pickle`` of the
    model copy it with the model (it is a plain object among the model's hooks).
    """

    def __init__(self, model: nn.Module) -> None:
        # (parent, attribute, layer, qualified name): object references, so that a copy's guard
        # watches the copy's layers. The model itself is not kept (None): it holds this guard,
        # and the cycle would keep a deleted model alive until the cyclic collector runs; the
        # hook is given it at each call.
        self.slots = [
            (parent if parent is not model else None, child_name, child,
             f"{parent_name}.{child_name}" if parent_name else child_name)
            for parent_name, parent in model.named_modules()
            for child_name, child in parent.named_children()
            if isinstance(child, CrossIterationBatchNormBase)
        ]

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not module.training or torch.compiler.is_compiling():
            return
        for parent, name, layer, _ in self.slots:
            if (module if parent is None else parent)._modules.get(name) is not layer:
                self._check(module)
                return

    def _check(self, model: nn.Module) -> None:
        replaced: dict[type, list[str]] = {}
        for parent, attribute, layer, name in self.slots:
            now = (model if parent is None else parent)._modules.get(attribute)
            if now is layer or not isinstance(now, _BatchNorm) or isinstance(now, CrossIterationBatchNormBase):
                continue
            if "act" in layer._modules and type(now).forward is not type(layer).forward and "act" in now._modules:
                name += " (its activation no longer runs)"
            replaced.setdefault(type(now), []).append(name)
        if not replaced:
            # Model surgery (a layer replaced by a non-BatchNorm module, or by another CBN): the
            # user's decision; watch the layers as they are now.
            self.__init__(model)
            return
        raise RuntimeError(message(replaced))


def message(replaced: dict[type, list[str]]) -> str:
    """The error for CBN layers replaced by other BatchNorm classes (class -> layer names)."""
    parts = []
    for cls, layers in replaced.items():
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        converter = CONVERTERS.get(_qualified(cls), "a converter that replaces every _BatchNorm")
        parts.append(f"{len(layers)} by {_qualified(cls)} ({shown}): that is what {converter} does")
    return (
        "cbn: Cross-Iteration BatchNorm layers of this model were replaced after cbn.convert_model, "
        + "; ".join(parts)
        + ". It sees CBN as a BatchNorm; training on would be SyncBatchNorm/BatchNorm, not CBN. "
        "Right order: do not run that converter on a CBN model; for statistics pooled over processes use "
        "cbn.convert_model(model, process_group=torch.distributed.group.WORLD) (cross-process CBN; window=1 "
        "is SyncBatchNorm), and with Lightning pass cbn.integrations.lightning.CrossIterationBatchNorm as a "
        "callback (it turns sync_batchnorm=True into cross-process CBN). To train with the other norm "
        "instead, call cbn.revert_model(model) first, then the converter. See docs/integrations.md."
    )


def install(model: nn.Module) -> ConverterGuard:
    """Put a :class:`ConverterGuard` on ``model`` (replacing an earlier one); it runs first."""
    remove(model)
    guard = ConverterGuard(model)
    model.register_forward_pre_hook(guard, prepend=True)
    return guard


def remove(model: nn.Module) -> None:
    """Remove the :class:`ConverterGuard` of ``model``, if any."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, ConverterGuard):
            del model._forward_pre_hooks[key]
