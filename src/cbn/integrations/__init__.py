"""cbn in the frameworks people train with: one module per framework, registering on import.

Each module makes cbn's layers selectable by the name or type the framework's own configuration
uses, and needs that framework only when imported (none is a dependency of cbn):

- :mod:`cbn.integrations.timm`: ``timm.create_model(name, norm_layer=cbn.CrossIterationBatchNorm2d)``
  (imported by ``import cbn`` as soon as timm is, since the user names no string there);
- :mod:`cbn.integrations.mmcv`: ``norm_cfg=dict(type="CBN", window=4, burnin=500)``;
- :mod:`cbn.integrations.monai`: ``norm=("cbn", {"window": 4})``;
- :mod:`cbn.integrations.lightning`: a ``Trainer`` callback that converts the model once, before
  DDP wraps it, and turns ``sync_batchnorm=True`` into cross-process CBN.

``docs/integrations.md`` has the lines a user writes for each, accelerate and detectron2 included.

Example::

    >>> import cbn.integrations.mmcv  # registers "CBN" in mmengine's MODELS registry
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Sequence

__all__ = ["import_after"]

_LOCK = threading.Lock()


class _ImportAfter(importlib.abc.MetaPathFinder):
    """Imports cbn's integration modules right after the framework module they register in.

    A finder at the front of ``sys.meta_path`` that only answers for the watched module names:
    it asks the other finders for the real spec and wraps its loader's ``exec_module``, so the
    integration runs once the framework module is fully executed, whatever imported it.
    """

    def __init__(self) -> None:
        self.pending: dict[str, list[str]] = {}

    def find_spec(self, name: str, path: Sequence[str] | None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        integrations = self.pending.pop(name)
        exec_module = loader.exec_module

        def exec_then_integrate(module) -> None:
            exec_module(module)
            for integration in integrations:
                importlib.import_module(integration)

        loader.exec_module = exec_then_integrate
        return spec


_FINDER = _ImportAfter()


def import_after(framework_module: str, integration: str) -> None:
    """Import ``integration`` once ``framework_module`` is imported: now if it already is.

    Example::

        >>> import_after("timm.layers.create_norm_act", "cbn.integrations.timm")
    """
    if framework_module in sys.modules:
        importlib.import_module(integration)
        return
    with _LOCK:
        _FINDER.pending.setdefault(framework_module, []).append(integration)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
