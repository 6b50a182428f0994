"""One-call conversion of any model between BatchNorm and Cross-Iteration BatchNorm."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers.cross_iteration_batchnorm import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    _CrossIterationBatchNorm,
)
from .layers.norm_act import CrossIterationBatchNormAct, CrossIterationBatchNormAct2d
from . import converter_guard, model_step
from .norm_swap import (
    layer_factory,
    original_of,
    qualified_name,
    replace_modules,
    share_norm_state,
    swap_norms,
    warn_unconverted,
)

# Kept under their former names (public since the first release).
replace_batchnorm = replace_modules
__all__ = ["convert_model", "revert_model", "convert_norms", "replace_batchnorm", "share_norm_state"]

_CBN_FOR = {
    nn.BatchNorm1d: CrossIterationBatchNorm1d,
    nn.BatchNorm2d: CrossIterationBatchNorm2d,
    nn.BatchNorm3d: CrossIterationBatchNorm3d,
    nn.SyncBatchNorm: CrossIterationBatchNorm,
}
# Norm + activation classes of timm, known by name (timm is not a dependency). Their forward is
# BatchNorm's, then their ``drop`` submodule, then their ``act`` submodule.
_CBN_ACT_FOR = {
    "timm.layers.norm_act.BatchNormAct2d": CrossIterationBatchNormAct2d,
    "timm.models.layers.norm_act.BatchNormAct2d": CrossIterationBatchNormAct2d,  # timm < 0.9
    "timm.layers.norm_act.SyncBatchNormAct": CrossIterationBatchNormAct,
}
_BN_FOR = {
    CrossIterationBatchNorm1d: nn.BatchNorm1d,
    CrossIterationBatchNorm2d: nn.BatchNorm2d,
    CrossIterationBatchNorm3d: nn.BatchNorm3d,
    CrossIterationBatchNorm: nn.SyncBatchNorm,
}
_UNKNOWN_FIX = (
    "A subclass may change BatchNorm's forward, so cbn does not guess what replacing it would change: they keep "
    "their own statistics (cbn.pairing_report does not list them). To make one cross-iteration, replace "
    "it by an nn.BatchNorm of the same shape (sharing its state) before calling convert_model."
)


def convert_norms(
    model: nn.Module,
    classes: dict[type, type],
    types: tuple[type, ...] = (_BatchNorm,),
    **layer_kwargs,
) -> nn.Module:
    """Replace each norm whose exact type is a key of ``classes`` by an instance of its value.

    The new layer gets the old one's ``num_features, eps, momentum, affine,
    track_running_stats, device, dtype`` (and ``bias=False`` if it has no bias), overridden by
    ``layer_kwargs``, and shares its parameters and running statistics. A norm of ``types``
    whose class is not a key is left as it is and named in one warning (values of ``classes``
    excepted). Returns the root (a new module if ``model`` is a norm).

    Example::

        >>> model = cbn.convert_norms(model, {nn.BatchNorm2d: cbn.BatchRenorm2d}, warmup_steps=100)
    """
    factories = {old: layer_factory(new, **layer_kwargs) for old, new in classes.items()}
    return swap_norms(model, factories, types, caller="cbn.convert_norms", keep=tuple(classes.values()))


def _cbn_factories(model: nn.Module, layer_kwargs: dict) -> dict:
    """The factory of each norm class of ``model`` that ``convert_model`` converts."""
    factories = {old: layer_factory(new, remember=True, **layer_kwargs) for old, new in _CBN_FOR.items()}
    for module in model.modules():
        new = _CBN_ACT_FOR.get(qualified_name(type(module))) if isinstance(module, _BatchNorm) else None
        if new is not None:
            factories[type(module)] = layer_factory(new, remember=True, children=("drop", "act"), **layer_kwargs)
    return factories


def convert_model(model: nn.Module, **layer_kwargs) -> nn.Module:
    r"""Replace every BatchNorm of ``model`` by a Cross-Iteration BatchNorm sharing its state.

    Converted kinds (exact classes; a subclass may change the forward):

    - ``nn.BatchNorm1d/2d/3d`` become :class:`CrossIterationBatchNorm1d/2d/3d`, ``nn.SyncBatchNorm``
      becomes :class:`CrossIterationBatchNorm` (any rank); an ``nn.LazyBatchNorm1d/2d/3d``
      already initialized counts as the class it turns into;
    - timm's ``BatchNormAct2d`` (norm, then its ``drop``, then its ``act`` submodule: most timm
      CNNs) becomes :class:`cbn.layers.norm_act.CrossIterationBatchNormAct2d` with the same
      ``drop`` and ``act`` modules, timm's ``SyncBatchNormAct`` likewise
      :class:`cbn.layers.norm_act.CrossIterationBatchNormAct`: :math:`y = \mathrm{act}(\mathrm{drop}(\mathrm{CBN}(x)))`.

    Not converted: ``torchvision.ops.FrozenBatchNorm2d`` and other frozen norms (not
    ``_BatchNorm``; they have no batch statistics) stay as they are, silently. Any other
    ``_BatchNorm`` subclass (timm's ``SplitBatchNorm2d``, ``cbn.BatchRenorm2d``, a user's
    subclass) is left as it is and named, with its Python module and layer names, in one
    warning. An ``nn.LazyBatchNorm*`` not initialized yet raises ``ValueError`` before anything
    changes: its channel count is unknown until its first forward, so, as for
    ``DistributedDataParallel``, run one forward of the model first.

    The new layers share the old ones' parameters and running statistics (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so optimizers built before the call keep
    working, and remember the original's class and attributes for :func:`revert_model`. Each
    layer reads, at every training forward, the convolution or linear map whose output it
    receives from autograd's record of it (:mod:`cbn.producer_call`), as a layer built directly
    does: converting is not needed for pairing. Layers whose input is not such an output average
    uncompensated statistics, and :func:`cbn.pairing_report` says why.

    CBN layers already in the model are kept. Two hooks on ``model``
    (:class:`cbn.model_step.ModelWindowStep`) record all layers' steps at once after each training
    forward, which saves most of the small per-layer operations of the record; layers called
    outside ``model.forward`` record their own.

    Args:
        model: any ``nn.Module``.
        **layer_kwargs: ``window``, ``burnin``, ``compensate``, ``differentiable_compensation``
            (default: on wherever ``compensate``; ``False`` for the paper's rule),
            ``process_group``, ``check_shared_use`` (and any other argument of :class:`CrossIterationBatchNorm2d` to
            override the copied ones). ``process_group`` (e.g. ``torch.distributed.group.WORLD``,
            after ``init_process_group``) pools each batch over its ranks before the window step;
            without it each rank normalizes with its own batches, like ``nn.BatchNorm`` under DDP.

    Distributed training: the windows are not buffers, so ``DistributedDataParallel`` (and
    FSDP) leave each rank's own; running statistics are broadcast from rank 0 like BatchNorm's.
    Do not run a SyncBatchNorm converter on the result: it would replace the CBN layers, and
    ``model`` raises at its next training forward (:mod:`cbn.converter_guard`);
    ``process_group`` is the cross-process form of CBN.

    Returns:
        ``model`` with its norms replaced (a new module if ``model`` itself is a BatchNorm).

    Example::

        >>> model = cbn.convert_model(timm.create_model("efficientnet_b0"), window=4, burnin=500)
    """

    # CBN layers are _BatchNorm too: those already in the model stay, silently, and are paired below.
    model = swap_norms(model, _cbn_factories(model, layer_kwargs), caller="cbn.convert_model", fix=_UNKNOWN_FIX,
                       keep=(_CrossIterationBatchNorm,))
    named = [(name or type(m).__name__, m) for name, m in model.named_modules() if isinstance(m, _CrossIterationBatchNorm)]
    if named:
        model_step.install(model, [m for _, m in named], [name for name, _ in named])
        # Another converter replacing these layers later (SyncBatchNorm's, timm's) is refused at the next training forward.
        converter_guard.install(model)
    return model


def revert_model(model: nn.Module) -> nn.Module:
    """Turn every Cross-Iteration BatchNorm layer of ``model`` back into the norm it was.

    A layer made by :func:`convert_model` becomes an instance of the exact class it replaced
    (``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, timm's ``BatchNormAct2d`` with its ``drop`` and
    ``act``, ...) with that norm's other attributes and hooks, holding the layer's current
    parameters and running statistics (shared, not copied): eval outputs are bit for bit those of
    the converted model. A CBN layer built directly becomes ``nn.BatchNorm1d/2d/3d``
    (``nn.SyncBatchNorm`` for :class:`CrossIterationBatchNorm`); any other CBN subclass built
    directly is left as it is and named in one warning. The model-level hooks are
    removed, so ``torch.nn.utils.fusion.fuse_conv_bn_eval``, TorchScript and ONNX export see a
    plain model.

    Example::

        >>> model = cbn.revert_model(model)  # after training; then fold, script or export it
    """

    unknown: dict[type, list[str]] = {}
    names = {module: name for name, module in model.named_modules()}

    def back(layer: _CrossIterationBatchNorm) -> nn.Module:
        original = original_of(layer)
        if original is not None:
            return original.rebuild(layer)
        plain = _BN_FOR.get(type(layer))
        if plain is None:
            unknown.setdefault(type(layer), []).append(names.get(layer) or "(root)")
            return layer
        return layer_factory(plain)(layer)

    model = replace_modules(model, back, (_CrossIterationBatchNorm,))
    warn_unconverted(unknown, "cbn.revert_model", "They were not made by cbn.convert_model, which remembers the class to restore.")
    model_step.remove(model)
    converter_guard.remove(model)
    return model
