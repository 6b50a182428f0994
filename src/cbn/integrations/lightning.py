"""Lightning: a ``Trainer`` callback that converts the model once, before DDP wraps it.

``Trainer(callbacks=[CrossIterationBatchNorm(window=4, burnin=500)])`` converts each submodule of
the ``LightningModule`` (``self.net``, ``self.backbone``, ...) with :func:`cbn.convert_model` in the
callback's ``setup``, on every rank, before the strategy moves the model, wraps it in
``DistributedDataParallel`` and restores a checkpoint (``ckpt_path=``). The
submodules are converted, not the ``LightningModule`` itself, because Lightning calls
``training_step``, not ``forward``: the model-level step and the converter guard hang on the
module whose ``forward`` runs.

Multi-process training:

- ``sync_batchnorm=False`` (default): each rank keeps its own window, as BatchNorm under DDP keeps
  its own batch statistics (cbn's windows are not buffers, so DDP's buffer broadcast leaves them; the
  running statistics are broadcast from rank 0 like BatchNorm's);
- ``sync_batchnorm=True``: Lightning would replace every ``_BatchNorm``, CBN included, by
  ``torch.nn.SyncBatchNorm``. The callback removes that plugin from the strategy and converts
  with ``process_group=torch.distributed.group.WORLD`` instead: cross-process CBN, whose window
  pools the batches of all ranks (``window=1`` is SyncBatchNorm).

This reads and clears ``Strategy._layer_sync``, the attribute through which Lightning applies
``sync_batchnorm`` (private, tested with pytorch-lightning 2.6.6; Lightning has no public hook to
replace it). ``process_group=`` given to the callback overrides the choice.

Example::

    >>> from cbn.integrations.lightning import CrossIterationBatchNorm
    >>> trainer = pl.Trainer(strategy="ddp", devices=4, sync_batchnorm=True,
    ...                      callbacks=[CrossIterationBatchNorm(window=4, burnin=500)])
"""

from __future__ import annotations

import weakref
from typing import Any

import torch.distributed as dist

try:  # the `lightning` package and the standalone `pytorch_lightning` are the same code under two names
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
except ImportError:
    from pytorch_lightning import Callback, LightningModule, Trainer
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

from ..convert import convert_model
from ..layers.cross_iteration_batchnorm import CrossIterationBatchNormBase

_AUTO = "auto"


class CrossIterationBatchNorm(Callback):
    """Convert the ``LightningModule``'s BatchNorms to Cross-Iteration BatchNorm once, at ``setup``.

    Args:
        process_group: ``"auto"``: ``torch.distributed.group.WORLD`` when the ``Trainer`` was given
            ``sync_batchnorm=True`` (whose ``SyncBatchNorm`` conversion is then not run), else
            ``None`` (a window per rank). Or a process group, or ``None``. Default: ``"auto"``
        **layer_kwargs: :func:`cbn.convert_model`'s ``window``, ``burnin``, ``compensate``,
            ``differentiable_compensation``, ...

    Example::

        >>> trainer = pl.Trainer(callbacks=[CrossIterationBatchNorm(window=4, burnin=500)])
        >>> trainer.fit(module)   # module.net's BatchNorms train as CBN
    """

    def __init__(self, process_group: Any = _AUTO, **layer_kwargs: Any) -> None:
        if "process_group" in layer_kwargs:
            raise TypeError("pass process_group once")
        self.process_group = process_group
        self.layer_kwargs = layer_kwargs
        self._converted: weakref.WeakSet = weakref.WeakSet()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        sync_requested = isinstance(getattr(strategy, "_layer_sync", None), TorchSyncBatchNorm)
        if sync_requested:
            # Lightning's SyncBatchNorm conversion would replace the CBN layers; cross-process CBN instead.
            strategy._layer_sync = None
        if pl_module in self._converted:
            return  # converted at an earlier fit/validate/test of this Trainer: keep windows and pairing
        group = self.process_group
        if group == _AUTO:
            group = dist.group.WORLD if sync_requested and dist.is_available() and dist.is_initialized() else None
        for name, child in list(pl_module.named_children()):
            converted = convert_model(child, process_group=group, **self.layer_kwargs)
            if converted is not child:
                setattr(pl_module, name, converted)
        if group is not None:
            # Layers built directly as CBN are kept as they are by convert_model: give them the group too.
            for layer in pl_module.modules():
                if isinstance(layer, CrossIterationBatchNormBase) and layer.process_group is None:
                    layer.process_group = group
        self._converted.add(pl_module)

