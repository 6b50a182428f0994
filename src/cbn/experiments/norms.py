"""Norm factories and models for the small-batch experiments.

Kinds:
    bn      nn.BatchNorm2d
    brn     Batch Renormalization (cbn.layers.batch_renorm)
    gn      nn.GroupNorm with ``gn_groups`` groups (fewer if the channel count is smaller)
    naive   Cross-Iteration BatchNorm without the Taylor compensation (compensate=False)
    cbn     Cross-Iteration BatchNorm
    cbn-diff  Cross-Iteration BatchNorm with differentiable compensation (our extension)
    syncbn  CPU SyncBatchNorm (cbn.layers.sync_batchnorm) over the default process group
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from cbn.experiments.models import resnet8, resnet20

NORM_KINDS = ("bn", "brn", "gn", "naive", "cbn", "cbn-diff", "syncbn")
# The cross-iteration kinds: naive averaging, the paper's compensation, and ours with gradients
# through the compensated past (``differentiable_compensation``, docs/method.md).
CROSS_ITERATION_OPTIONS = {
    "naive": dict(compensate=False),
    "cbn": dict(compensate=True, differentiable_compensation=False),
    "cbn-diff": dict(compensate=True, differentiable_compensation=True),
}
MODELS = {"resnet20": resnet20, "resnet8": resnet8}

_BRN_KEYS = ("rmax", "dmax", "warmup_steps", "rmax_ramp_steps", "dmax_ramp_steps")
_CBN_KEYS = ("window", "burnin")
_COMMON_KEYS = ("eps", "momentum")


def _pick(options: dict, keys) -> dict:
    return {k: options[k] for k in keys if k in options and options[k] is not None}


def make_norm(kind: str, **options) -> Callable[[int], nn.Module]:
    """A factory ``norm(num_channels) -> nn.Module`` for the given kind.

    Options (ignored when they do not apply to the kind): ``eps``, ``momentum``;
    ``gn_groups`` (gn, default 8); ``rmax, dmax, warmup_steps, rmax_ramp_steps,
    dmax_ramp_steps`` (brn); ``window, burnin`` (naive, cbn); ``process_group`` (syncbn).

    For naive and cbn the layers still need their producing convolutions: build the model with
    :func:`build_model`, which uses BatchNorm and then ``cbn.convert_model`` (the converter
    discovers the conv -> norm pairs).
    """
    common = _pick(options, _COMMON_KEYS)
    if kind == "bn":
        return lambda c: nn.BatchNorm2d(c, **common)
    if kind == "gn":
        groups = int(options.get("gn_groups") or 8)
        return lambda c: nn.GroupNorm(min(groups, c), c, eps=common.get("eps", 1e-5))
    if kind == "brn":
        from cbn.layers.batch_renorm import BatchRenorm2d

        extra = _pick(options, _BRN_KEYS)
        return lambda c: BatchRenorm2d(c, **common, **extra)
    if kind in CROSS_ITERATION_OPTIONS:
        from cbn import CrossIterationBatchNorm2d

        extra = _pick(options, _CBN_KEYS)
        return lambda c: CrossIterationBatchNorm2d(c, **common, **extra, **CROSS_ITERATION_OPTIONS[kind])
    if kind == "syncbn":
        from cbn.layers.sync_batchnorm import SyncBatchNorm2d

        group = options.get("process_group")
        return lambda c: SyncBatchNorm2d(c, **common, process_group=group)
    raise ValueError(f"unknown norm kind {kind!r}; choose from {NORM_KINDS}")


def build_model(model: str, kind: str, **options) -> nn.Module:
    """Model ``model`` (resnet20 / resnet8) with every norm of kind ``kind``."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    if kind in CROSS_ITERATION_OPTIONS:
        import cbn

        net = MODELS[model](nn.BatchNorm2d)
        layer_kwargs = _pick(options, _COMMON_KEYS + _CBN_KEYS)
        return cbn.convert_model(net, **layer_kwargs, **CROSS_ITERATION_OPTIONS[kind])
    return MODELS[model](make_norm(kind, **options))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every normalization layer, in registration order."""
    from torch.nn.modules.batchnorm import _NormBase

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (_NormBase, nn.GroupNorm))]
