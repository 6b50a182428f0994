"""Which norm layers of a converted model compensate their statistics, by which producer, or why not.

Converting a large model pairs each Cross-Iteration BatchNorm layer with the convolution or linear
layer whose output it normalizes, at the first training forward. :func:`pairing_report` tells the
outcome per layer, so a user sees at a glance which layers run the Taylor step and which fall back
to naive averaging (input not a producer output, custom producer forward, frozen producer, ...).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .layers.cross_iteration_batchnorm import CrossIterationBatchNormBase


class Pairing(NamedTuple):
    """One norm layer: its name, whether it is compensated, its producer's name, and why not."""

    layer: str
    compensated: bool
    producer: str | None
    reason: str


def pairing_report(model: nn.Module) -> list[Pairing]:
    """The pairing of every Cross-Iteration BatchNorm layer of ``model``, in module order.

    Pairing happens at a layer's first training forward; before it the reason is
    ``"no training forward yet"``.

    Example::

        >>> model = cbn.convert_model(net)
        >>> model(x).sum().backward()
        >>> print(cbn.format_pairing_report(cbn.pairing_report(model)))
    """
    names = {module: name for name, module in model.named_modules()}
    rows = []
    for name, layer in model.named_modules():
        if isinstance(layer, CrossIterationBatchNormBase):
            compensated, producer, reason = layer.pairing_status()
            producer_name = None if producer is None else names.get(producer, type(producer).__name__)
            rows.append(Pairing(name or type(layer).__name__, compensated, producer_name, reason))
    return rows


def pairing_summary(rows: list[Pairing]) -> str:
    """One line: how many layers are compensated, and the reasons of the others, counted."""
    reasons: dict[str, int] = {}
    for row in rows:
        if not row.compensated:
            reasons[row.reason] = reasons.get(row.reason, 0) + 1
    text = f"{sum(r.compensated for r in rows)} of {len(rows)} CBN layers compensated"
    if reasons:
        text += "; not: " + "; ".join(f"{count} x {reason}" for reason, count in reasons.items())
    return text


def format_pairing_report(rows: list[Pairing]) -> str:
    """A plain-text table of :func:`pairing_report`, one line per layer, and the summary line."""
    width = max([len("layer"), *(len(r.layer) for r in rows)])
    lines = [f"{'layer':<{width}}  compensated  producer / reason"]
    for row in rows:
        detail = row.producer if row.compensated else (row.reason + (f" ({row.producer})" if row.producer else ""))
        lines.append(f"{row.layer:<{width}}  {'yes' if row.compensated else 'no':<11}  {detail}")
    lines.append(pairing_summary(rows))
    return "\n".join(lines)
