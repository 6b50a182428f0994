"""Which norm layers of a converted model compensate their statistics, by which producer, or why not.

Each Cross-Iteration BatchNorm layer finds, at every training forward, the convolution or linear
map whose output it normalizes (:mod:`cbn.producer_call`). :func:`pairing_report` tells the
outcome of each layer's latest training forward, so a user sees at a glance which layers run the Taylor step and which fall back
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

    Pairing is read at every training forward; before the first the reason is
    ``"no training forward yet"``. The producer is named by the module holding its weight.

    Example::

        >>> model = cbn.convert_model(net)
        >>> model(x).sum().backward()
        >>> print(cbn.format_pairing_report(cbn.pairing_report(model)))
    """
    owners = {id(parameter): name.rsplit(".", 1)[0] if "." in name else "(root)"
              for name, parameter in model.named_parameters(remove_duplicate=False)}
    for name, module in model.named_modules():
        if "parametrizations" in name:  # a parametrized weight belongs to the module holding it
            for pname, parameter in module.named_parameters():
                owners[id(parameter)] = name.split(".parametrizations")[0]
    rows = []
    for name, layer in model.named_modules():
        if isinstance(layer, CrossIterationBatchNormBase):
            compensated, parameters, reason = layer.pairing_status()
            producer_name = next((owners[id(p)] for p in parameters if id(p) in owners), None)
            if producer_name is None and parameters:
                producer_name = "a producer outside this model"
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
