"""One-call conversion of any model between BatchNorm and Cross-Iteration BatchNorm."""

from __future__ import annotations

from typing import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .layers.cross_iteration_batchnorm import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    _CrossIterationBatchNorm,
)
from . import model_step
from .distributed import ignore_windows_in_ddp
from .producers import ProducerRegistry, remove_hooks

_CBN_FOR = {
    nn.BatchNorm1d: CrossIterationBatchNorm1d,
    nn.BatchNorm2d: CrossIterationBatchNorm2d,
    nn.BatchNorm3d: CrossIterationBatchNorm3d,
    nn.SyncBatchNorm: CrossIterationBatchNorm,
}
_BN_FOR = {
    CrossIterationBatchNorm1d: nn.BatchNorm1d,
    CrossIterationBatchNorm2d: nn.BatchNorm2d,
    CrossIterationBatchNorm3d: nn.BatchNorm3d,
    CrossIterationBatchNorm: nn.SyncBatchNorm,
}


def replace_batchnorm(
    module: nn.Module,
    factory: Callable[[nn.Module], nn.Module],
    types: tuple[type, ...] = (_BatchNorm,),
) -> nn.Module:
    """Replace every submodule of one of ``types`` by ``factory(submodule)``, recursively.

    Returns the module itself, or its replacement when ``module`` is of one of ``types``.
    """
    if isinstance(module, types):
        return factory(module)
    for name, child in module.named_children():
        replacement = replace_batchnorm(child, factory, types)
        if replacement is not child:
            module.add_module(name, replacement)
    return module


def share_norm_state(source: _NormBase, target: _NormBase) -> _NormBase:
    """Give ``target`` the parameters and running-statistics buffers of ``source`` (no copy)."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    if source.track_running_stats and target.track_running_stats:
        target.running_mean = source.running_mean
        target.running_var = source.running_var
        target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    return target


def _norm_factory_kwargs(norm: _NormBase) -> dict:
    reference = norm.weight if norm.affine else norm.running_mean
    kwargs = dict(eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                  track_running_stats=norm.track_running_stats)
    if reference is not None:
        kwargs.update(device=reference.device, dtype=reference.dtype)
    if norm.affine and norm.bias is None:
        kwargs.update(bias=False)
    return kwargs


def convert_norms(
    model: nn.Module,
    classes: dict[type, type],
    types: tuple[type, ...] = (_BatchNorm,),
    **layer_kwargs,
) -> nn.Module:
    """Replace each norm whose exact type is a key of ``classes`` by an instance of its value.

    The new layer gets the old one's ``num_features, eps, momentum, affine,
    track_running_stats, device, dtype`` (overridden by ``layer_kwargs``) and shares its
    parameters and running statistics. Returns the root (a new module if ``model`` is a norm).
    """

    def make_layer(norm: _NormBase) -> nn.Module:
        layer_class = classes.get(type(norm))
        if layer_class is None:
            return norm
        kwargs = {**_norm_factory_kwargs(norm), **layer_kwargs}
        return share_norm_state(norm, layer_class(norm.num_features, **kwargs))

    return replace_batchnorm(model, make_layer, types)


def convert_model(model: nn.Module, **layer_kwargs) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` of ``model`` by CBN layers.

    The new layers share the old ones' parameters and running statistics (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so optimizers built before the call keep
    working. Each layer finds by itself, at its first training forward, the ``nn.Conv1d/2d/3d``,
    ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` whose output it receives (see
    :mod:`cbn.producers`); layers whose input is not directly such an output average
    uncompensated statistics, and one warning names them.
    CBN layers already in the model are kept and paired the same way. Two hooks on ``model``
    (:class:`cbn.model_step.ModelWindowStep`) summarize all windows at once before each
    training forward and record all layers' steps at once after it, which saves most of the small
    per-layer operations; layers called outside ``model.forward`` summarize and record their own.

    Args:
        model: any ``nn.Module``.
        **layer_kwargs: ``window``, ``burnin``, ``compensate``, ``process_group``,
            ``check_shared_use`` (and any other argument of :class:`CrossIterationBatchNorm2d` to
            override the copied ones). ``process_group`` (e.g. ``torch.distributed.group.WORLD``,
            after ``init_process_group``) pools each batch over its ranks before the window step;
            without it each rank normalizes with its own batches, like ``nn.BatchNorm`` under DDP.

    Distributed training: the window buffers and iteration counters of every CBN layer are
    registered as buffers ``DistributedDataParallel`` ignores (see
    :func:`cbn.distributed.ignore_windows_in_ddp`), so that ``broadcast_buffers=True`` does not
    overwrite each rank's window with rank 0's; running statistics are still broadcast from rank 0
    like BatchNorm's, and all parameters are synchronized. Wrap ``model`` itself in DDP, or call
    ``ignore_windows_in_ddp`` on the module you wrap.

    Returns:
        ``model`` with its norms replaced (a new module if ``model`` itself is a BatchNorm).

    Example::

        >>> model = cbn.convert_model(my_resnet, window=4, burnin=500)
    """

    model = convert_norms(model, _CBN_FOR, **layer_kwargs)
    named_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _CrossIterationBatchNorm)]
    if not named_layers:
        return model  # no norm to pair: no taps, which would keep every producer's input alive
    registry = ProducerRegistry.install(model)
    layers = []
    for name, module in named_layers:
        module.attach(registry, name or type(module).__name__)
        layers.append(module)
    model_step.install(model, layers)
    # Each rank keeps its own window under DDP (broadcast_buffers=True copies rank 0's buffers).
    ignore_windows_in_ddp(model)
    return model


def revert_model(model: nn.Module) -> nn.Module:
    """Turn every Cross-Iteration BatchNorm layer of ``model`` back into ``nn.BatchNorm``.

    The BatchNorm layers carry the parameters and running statistics (shared, not copied), and
    the producer hooks are removed, so ``torch.nn.utils.fusion.fuse_conv_bn_eval``, TorchScript
    and ONNX export see a plain model. Layers converted from ``nn.SyncBatchNorm`` become
    ``nn.SyncBatchNorm`` again.
    """

    model = convert_norms(model, _BN_FOR, (_CrossIterationBatchNorm,))
    remove_hooks(model)
    model_step.remove(model)
    return model
