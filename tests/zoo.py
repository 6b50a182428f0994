"""Shared check of the zoo tests (tests/test_zoo_torchvision.py, tests/test_zoo_timm.py).

For one real third-party model: record, with hooks of this file only (no cbn code), which
BatchNorm layers receive the very output tensor of an ``nn.Conv*``/``nn.ConvTranspose*``/
``nn.Linear`` call; convert with ``cbn.convert_model``; train a few SGD steps with the window
pooling from the first step (``burnin=0``); compare ``cbn.pairing_report`` with the record;
revert; and require the reverted model to have the original's module classes and to give, in
eval mode, bit for bit the outputs of the converted model and of an unconverted copy loaded with
its state dict.

Inputs are composed scenes of real images: Fashion-MNIST test items (the Debian package
``dataset-fashion-mnist``) pasted on a larger blank canvas at seeded positions, with their exact
boxes, masks and labels for the detectors.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import cbn
from cbn.experiments.data import load_split, normalize
from cbn.layers.cross_iteration_batchnorm import _CrossIterationBatchNorm

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
NO_PRODUCER = "input is the result of "
MODIFIED = "input is the result of "  # an in-place op is the last op autograd recorded
WINDOW = 3
STEPS = 3


@functools.lru_cache(maxsize=1)
def _items() -> tuple[Tensor, Tensor]:
    images, labels = load_split("test")
    return images[:64], labels[:64]


def scenes(count: int, size: int, seed: int, items_per_scene: int = 2) -> tuple[Tensor, list[dict]]:
    """``count`` composed RGB scenes ``(count, 3, size, size)`` (standardized) and their targets.

    Each scene holds ``items_per_scene`` Fashion-MNIST items (28 x 28, or ``size`` if smaller)
    at seeded positions on a zero canvas; a target is ``{"boxes", "labels", "masks"}`` with the
    exact box of each item's nonzero pixels, label + 1 (0 is background) and a binary mask.
    """
    images, labels = _items()
    generator = torch.Generator().manual_seed(seed)
    side = min(28, size)
    canvases, targets = [], []
    for _ in range(count):
        canvas = torch.zeros(size, size, dtype=torch.uint8)
        boxes, classes, masks = [], [], []
        for _ in range(items_per_scene):
            index = int(torch.randint(len(images), (1,), generator=generator))
            item = images[index, 0, :side, :side]
            top, left = (int(v) for v in torch.randint(size - side + 1, (2,), generator=generator))
            canvas[top:top + side, left:left + side] = torch.maximum(canvas[top:top + side, left:left + side], item)
            mask = torch.zeros(size, size, dtype=torch.uint8)
            mask[top:top + side, left:left + side] = (item > 0).to(torch.uint8)
            rows, cols = mask.nonzero(as_tuple=True)
            boxes.append([float(cols.min()), float(rows.min()), float(cols.max()) + 1, float(rows.max()) + 1])
            classes.append(int(labels[index]) + 1)
            masks.append(mask)
        canvases.append(canvas)
        targets.append(dict(boxes=torch.tensor(boxes), labels=torch.tensor(classes), masks=torch.stack(masks)))
    x = normalize(torch.stack(canvases)[:, None]).expand(-1, 3, -1, -1).contiguous()
    return x, targets


def tensors_of(output) -> list[Tensor]:
    """Every tensor of a nested model output (tensor, dict, list, tuple), in a fixed order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in tensors_of(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors_of(item)]
    return []


def record_producer_feeds(model: nn.Module, run: Callable[[nn.Module], object]) -> dict[str, str]:
    """For each ``_BatchNorm`` of ``model`` (module order): how its input relates to a producer.

    ``"direct"``: at every call, the input is the very tensor object a producer (an instance of
    :data:`PRODUCERS`) returned earlier in the same forward, with its channels (dim 1 of a
    convolution's output, the last dim of a linear layer's) on dim 1; ``"view"``: a view of such
    a tensor (same ``._base``) with as many channels, not the tensor itself; ``"modified"``: one
    of these, but modified in place since the producer returned it (e.g. ``x += identity``,
    which changes its statistics); ``"other"``:
    anything else (after an activation, a concatenation, an addition, ...). ``run(model)``
    does one training forward, under ``no_grad`` here.
    """
    outputs: dict[int, tuple[Tensor, int, int]] = {}  # id -> (output, its channel count, its version)
    storages: dict[int, tuple[Tensor, int, int]] = {}  # id of the output's base tensor -> (base, channels, version)
    calls: dict[str, list[str]] = {}
    hooks = []

    def base_of(tensor: Tensor) -> Tensor:
        return tensor if tensor._base is None else tensor._base

    def keep_output(module, args, output):
        if isinstance(output, Tensor):
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            outputs[id(output)] = (output, channels, output._version)
            storages[id(base_of(output))] = (base_of(output), channels, base_of(output)._version)

    def found(table, tensor) -> tuple[int, bool] | None:
        """(channels, modified in place since) of a recorded tensor, or None."""
        entry = table.get(id(tensor))
        return (entry[1], tensor._version != entry[2]) if entry is not None and entry[0] is tensor else None

    def classify(name, module, args):
        x = args[0]
        direct, view = found(outputs, x), found(storages, base_of(x))
        if direct is not None and direct[0] == x.shape[1]:
            kind = "modified" if direct[1] else "direct"
        elif view is not None and view[0] == x.shape[1]:
            kind = "modified" if view[1] else "view"
        else:
            kind = "other"
        calls.setdefault(name, []).append(kind)

    names = []
    for name, module in model.named_modules():
        if isinstance(module, PRODUCERS):
            hooks.append(module.register_forward_hook(keep_output))
        if isinstance(module, _BatchNorm):
            names.append(name)
            hooks.append(module.register_forward_pre_hook(functools.partial(classify, name)))
    model.train()
    with torch.no_grad():
        run(model)
    for hook in hooks:
        hook.remove()
    record = {}
    for name in names:
        kinds = set(calls.get(name, ["never called"]))
        record[name] = kinds.pop() if len(kinds) == 1 else "mixed"
    return record


def check_model(
    make: Callable[[], nn.Module],
    train_loss: Callable[[nn.Module, int], Tensor],
    evaluate: Callable[[nn.Module], object],
    lr: float = 0.01,
) -> dict[str, int]:
    """Convert, train, check the pairing report and the windows, revert, check eval outputs.

    ``train_loss(model, step)`` is a scalar loss of a training forward on the batch of ``step``
    (step 0 is also the batch of the independent record); ``evaluate(model)`` is the eval-mode
    output on a fixed batch. Returns the counts ``norms``, ``compensated``, ``direct``, ``view``.
    """
    torch.manual_seed(0)
    reference = make()
    norm_count = sum(isinstance(m, _BatchNorm) for m in reference.modules())
    record = record_producer_feeds(copy.deepcopy(reference), lambda m: train_loss(m, 0))
    assert norm_count > 0 and len(record) == norm_count
    assert "never called" not in record.values() and "mixed" not in record.values(), record
    direct = {name for name, kind in record.items() if kind == "direct"}
    views = {name for name, kind in record.items() if kind == "view"}
    assert direct  # the comparison below is not vacuous

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cbn.convert_model(copy.deepcopy(reference), window=WINDOW, burnin=0)
    assert not [w for w in caught if "left these norm layers" in str(w.message)], [str(w.message) for w in caught]
    # Every kind converted (the CBN layers are _BatchNorm subclasses themselves).
    assert all(isinstance(m, _CrossIterationBatchNorm) for m in model.modules() if isinstance(m, _BatchNorm))

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            loss = train_loss(model, step)
            assert torch.isfinite(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    rows = cbn.pairing_report(model)
    assert [row.layer for row in rows] == list(record)
    compensated = {row.layer for row in rows if row.compensated}
    # One warning names every norm left uncompensated, and no other warning comes from cbn.
    messages = [str(w.message) for w in caught if "cbn" in str(w.message)]
    uncompensated = [row.layer for row in rows if not row.compensated]
    assert len(messages) == (1 if uncompensated else 0), messages
    for layer in uncompensated:
        assert f"{layer} (" in messages[0], layer
    # Every norm fed by a producer's very output is compensated; one fed through a view may be
    # (the layer pairs views that keep the channel axis) or not; no other is.
    assert direct <= compensated <= direct | views, (sorted(direct - compensated), sorted(compensated - direct - views))
    for row in rows:
        if not row.compensated and row.layer not in views:
            expected = MODIFIED if record[row.layer] == "modified" else NO_PRODUCER
            assert row.reason.startswith((expected, "input is a concatenation")), row
    for name, layer in model.named_modules():
        if isinstance(layer, _CrossIterationBatchNorm):
            # The window is full: STEPS >= WINDOW training forwards stored WINDOW - 1 past entries.
            assert layer.window_statistics()["mean"].shape[0] == WINDOW - 1, name
            assert bool(torch.isfinite(layer.running_var).all()), name

    model.eval()
    with torch.no_grad():
        converted_out = tensors_of(evaluate(model))
        reverted = cbn.revert_model(model)
        assert [(n, type(m)) for n, m in reverted.named_modules()] == [
            (n, type(m)) for n, m in reference.named_modules()
        ]
        reverted_out = tensors_of(evaluate(reverted))
        reference.load_state_dict(reverted.state_dict())
        reference.eval()
        reference_out = tensors_of(evaluate(reference))
    assert converted_out and len(converted_out) == len(reverted_out) == len(reference_out)
    for a, b, c in zip(converted_out, reverted_out, reference_out):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    modified = sum(kind == "modified" for kind in record.values())
    return dict(norms=norm_count, compensated=len(compensated), direct=len(direct), view=len(views), modified=modified)


def produced_by(norm, module) -> bool:
    """Whether ``norm``'s latest training forward was compensated with ``module``'s weight."""
    compensated, parameters, _ = norm.pairing_status()
    return compensated and bool(parameters) and parameters[0] is module.weight
