"""Which forward a recompute replays: activation checkpointing's second run of a forward.

``torch.utils.checkpoint`` (either ``use_reentrant``) runs a checkpointed region's forward again
during backward. A Cross-Iteration BatchNorm layer must then normalize with the past summary of
the forward being replayed (its window has since received that forward's entry), and record
nothing. Several forwards may precede one backward (two views of a batch, siamese calls, summed
micro-batches), replayed in any order, so the replayed forward is recognised by what it computes:
its batch mean, equal in the recompute to the original's (same input, same weights).
"""

from __future__ import annotations

from torch import Tensor

from ..functional.window import PastStatistics

# Forwards kept per layer and iteration (the oldest go first): those that may be replayed, run
# under activation checkpointing (its forward hooks, or no_grad for use_reentrant=True).
_LIMIT = 4


class KeptForwards:
    """The batch means and past summaries of a layer's training forwards in this iteration."""

    def __init__(self) -> None:
        self._forwards: list[tuple[Tensor, PastStatistics | None, object]] = []

    def keep(self, batch_mean: Tensor, past: PastStatistics | None, ticket=None) -> None:
        """Keep a forward: its batch mean, past summary and, when its entry awaits its statistic
        gradients, the :class:`~cbn.layers.window_record.EntryTicket` of that entry."""
        if len(self._forwards) >= _LIMIT:
            del self._forwards[0]
        self._forwards.append((batch_mean.detach(), past, ticket))

    def pending_slots(self, window) -> set[int]:
        """Slots of ``window`` whose entries await their gradients from a replay still to come."""
        return {ticket.slot for _, _, ticket in self._forwards
                if ticket is not None and ticket.window is window and ticket.slot is not None}

    def clear(self) -> None:
        self._forwards = []

    def find(self, batch_mean: Tensor, num_features: int) -> tuple[Tensor, PastStatistics | None, object]:
        """``(its batch mean, past summary, ticket)`` of the kept forward whose batch mean is closest to
        ``batch_mean`` (equal up to rounding), which is then no longer kept: each forward is
        replayed once."""
        best, best_error = None, None
        for index, (kept_mean, _, _) in enumerate(self._forwards):
            if kept_mean.shape != batch_mean.shape:
                continue
            error = float((kept_mean - batch_mean).abs().max())
            if best_error is None or error < best_error:
                best, best_error = index, error
        if best is None or best_error > 1e-3 * (1.0 + float(batch_mean.abs().max())):
            raise RuntimeError(
                f"a CrossIterationBatchNorm({num_features}) layer is recomputed during backward (activation "
                "checkpointing) with an input that no training forward of this iteration had, so the "
                "statistics of the forward being replayed cannot be found. Is the checkpointed function "
                "deterministic (no dropout without preserve_rng_state, no data-dependent branches)?"
            )
        return self._forwards.pop(best)

    def __deepcopy__(self, memo):
        return KeptForwards()

    def __getstate__(self) -> dict:
        return {"_forwards": []}
