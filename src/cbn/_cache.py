"""Small caches of constant tensors on the per-step path, bounded so that they cannot grow
without limit when shapes, values or devices keep changing."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

Value = TypeVar("Value")


def bounded_get(cache: dict, key, make: Callable[[], Value], limit: int) -> Value:
    """``cache[key]``, made by ``make()`` when missing; the cache is emptied when it holds more
    than ``limit`` entries. Cached tensors are shared: callers only read them."""
    found = cache.get(key)
    if found is None:
        if len(cache) > limit:
            cache.clear()
        # A tensor made under torch.inference_mode would be an inference tensor, which every
        # later autograd use of the cache (in any model of the process) would reject.
        with torch.inference_mode(False):
            found = cache[key] = make()
    return found
