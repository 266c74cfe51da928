"""Programming a training step's updates into every analog layer of a model at once.

The optimizer addresses the analog weights of a :class:`~cim_hil.nn.store.WeightStore` by
their flat index and hands over the weights whose accumulated update reached the granularity,
with their signed step counts. The write-verify layers of a store (one tile spec, one mapping
config) are written by one ``program_places`` call of the store's group, and the store
follows in a few tensor operations, so a step costs about the same however many layers the
model has.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cim_hil.nn.mapping import LevelWrite
from cim_hil.nn.store import WeightStore

Commit = Callable[[], None]
Agree = Callable[[torch.Tensor], torch.Tensor]


class StepProgrammer:
    """Programs signed steps of the granularity (epsilon) into the weights of ``store``.

    ``agree``, if given, turns the changes (levels, or pulses) the devices took into the ones
    to record: what data-parallel replicas, each programming its own devices, all record.
    """

    def __init__(self, store: WeightStore, agree: Agree | None = None) -> None:
        self.store, self.agree = store, agree
        self.granularity = store.granularity

    @torch.no_grad()
    def program(self, weights: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Commit]:
        """Program ``steps`` (k,) into ``weights`` (k,), sorted flat indices of the store.

        Returns the weight change each took, read back after verify (so the caller can account
        for exactly that), whether it was programmed (a device already at the bound it is
        pushed towards is not), and how to make the store follow. The store changes only
        when that is called, after every device is programmed: if the board fails midway, the
        host still holds the state from before (a resume re-writes the devices from it).
        """
        if self.store.levels is not None:
            return self._program_levels(weights, steps)
        return self._program_pulses(weights, steps)

    def _program_levels(self, weights: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Commit]:
        store = self.store
        mapping = store.mappings[0]  # the level conventions every layer of the store shares
        before = store.levels.index_select(0, weights)
        after = steps.mul(mapping.config.granularity_levels).add_(before).clamp_(mapping.low, mapping.high)
        reached = LevelWrite(mapping, store.group, store.places.index_select(0, weights), after, before).run()
        if self.agree is not None:
            reached = self.agree(reached - before).add_(before)
        level_weight = store.level_weight.index_select(0, weights)
        applied = (reached - before) * level_weight

        def commit() -> None:
            store.levels.index_copy_(0, weights, reached)
            store.weights.index_copy_(0, weights, reached * level_weight)

        return applied, after != before, commit

    def _program_pulses(self, weights: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Commit]:
        """Open-loop layers, one after the other: signed pulse counts, applied as the tiles report."""
        store = self.store
        counts = torch.zeros(len(store), dtype=torch.int64).index_put_((weights,), steps)
        pulses = torch.cat([
            mapping.program_pulses(counts[start:end].view(shape)).reshape(-1)
            for mapping, start, end, shape in zip(store.mappings, store.starts, store.starts[1:], store.shapes)
        ]).index_select(0, weights)
        if self.agree is not None:
            pulses = self.agree(pulses)
        applied = pulses * store.granularity.index_select(0, weights)
        return applied, pulses != 0, lambda: store.weights.index_add_(0, weights, applied)
