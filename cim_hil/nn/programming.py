"""Programming a training step's updates into every analog layer of a model at once.

The optimizer addresses the analog weights of a model by one flat index, layer after layer, and
hands over the weights whose accumulated update reached the granularity with their signed step
counts. The write-verify layers that share a tile spec and mapping config (every layer of a
model on one chip) are written by one ``program_devices`` call, and the host's copies follow in
a few tensor operations, so a step costs about the same however many layers the model has.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from cim_hil.nn.layers import AnalogLayer
from cim_hil.nn.mapping import LevelWrite

# What programming one part returned: the weight change each weight took, whether it was
# programmed, and how to make the host's copies follow once every part has been programmed.
Outcome = tuple[torch.Tensor, torch.Tensor, Callable[[], None]]
Agree = Callable[[torch.Tensor], torch.Tensor]


class StepProgrammer:
    """Programs signed steps of the granularity into the weights of ``layers``.

    ``layers`` holds them in the order of the flat index (layers that share one write-verify
    call next to each other); ``granularity`` the step (epsilon) of every weight. ``agree``, if
    given, turns the changes (levels, or pulses) the devices took into the ones to record: what
    data-parallel replicas, each programming its own devices, all record.
    """

    def __init__(self, layers: list[AnalogLayer], agree: Agree | None = None) -> None:
        self.parts: list[_LevelPart | _PulsePart] = [
            _LevelPart(group, agree) if group[0].levels is not None else _PulsePart(group[0], agree)
            for group in _parts(layers)
        ]
        self.layers = [layer for part in self.parts for layer in part.layers]
        self.granularity = torch.cat([torch.full((layer.weight.numel(),), layer.granularity) for layer in self.layers])
        self._part_ends = torch.tensor(list(itertools.accumulate(part.size for part in self.parts)))

    @torch.no_grad()
    def program(self, weights: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Program ``steps`` (k,) into ``weights`` (k,), sorted flat indices.

        Returns the weight change each took, read back after verify (so the caller can account
        for exactly that), and whether it was programmed (a device already at the bound it is
        pushed towards is not). Every device is programmed before any host copy changes, so if
        the board fails midway the host still holds the state from before (a resume re-writes
        the devices from it).
        """
        outcomes = [part.program(chosen, part_steps) for part, chosen, part_steps in _split(
            self.parts, weights, steps, self._part_ends)]
        for _, _, commit in outcomes:
            commit()
        if len(outcomes) == 1:
            return outcomes[0][0], outcomes[0][1]
        return torch.cat([applied for applied, _, _ in outcomes]), torch.cat([programmed for _, programmed, _ in outcomes])


class _LevelPart:
    """Write-verify layers with one tile spec and mapping config: one ``program_devices`` call.

    The layers' levels and weights are views of one flat tensor each, so a step reads and
    writes them in one operation whatever the number of layers; if anything replaces a layer's
    tensor (``layer.levels = ...``), they are joined again on the next step.
    """

    def __init__(self, layers: list[AnalogLayer], agree: Agree | None = None) -> None:
        self.layers, self.agree = layers, agree
        self.mapping = mapping = layers[0].mapping
        # Each tile once, though packed layers share tiles: one array must not be written twice in one call.
        self.tiles = list({id(tile): tile for layer in layers for tile in layer.mapping.tiles}.values())
        position = {id(tile): index for index, tile in enumerate(self.tiles)}
        per_tile = mapping.spec.rows * mapping.spec.cols
        # Where each weight's devices sit in the stack of ``tiles``, and what one level weighs.
        self.places = torch.cat([_restacked(layer.mapping.device_index.view(-1), per_tile,
                                            [position[id(tile)] for tile in layer.mapping.tiles]) for layer in layers])
        self.level_weight = torch.cat([torch.full((layer.weight.numel(),), layer.mapping.weights_for(1))
                                       for layer in layers])
        self.size = len(self.places)
        self._join()

    def _join(self) -> None:
        self.levels, level_views = join_flat([layer.levels for layer in self.layers])
        self.weights, weight_views = join_flat([layer.weight.detach() for layer in self.layers])
        for layer, levels, weights in zip(self.layers, level_views, weight_views):
            layer.levels = levels
            layer.weight.data = weights
        self._joined = [(layer.levels.data_ptr(), layer.weight.data_ptr()) for layer in self.layers]

    def program(self, weights: torch.Tensor, steps: torch.Tensor) -> Outcome:
        if any(layer.levels.data_ptr() != levels or layer.weight.data_ptr() != values
               for layer, (levels, values) in zip(self.layers, self._joined)):
            self._join()
        mapping = self.mapping
        before = self.levels.index_select(0, weights)
        after = steps.mul(mapping.config.granularity_levels).add_(before).clamp_(mapping.low, mapping.high)
        reached = LevelWrite(mapping, self.tiles, self.places.index_select(0, weights), after, before).run()
        if self.agree is not None:
            reached = self.agree(reached - before).add_(before)
        level_weight = self.level_weight.index_select(0, weights)
        applied = (reached - before) * level_weight
        return applied, after != before, lambda: self._commit(weights, reached, reached * level_weight)

    def _commit(self, weights: torch.Tensor, levels: torch.Tensor, values: torch.Tensor) -> None:
        """The host's copies follow: ``levels`` and weight ``values`` of ``weights``."""
        self.levels.index_copy_(0, weights, levels)
        self.weights.index_copy_(0, weights, values)


class _PulsePart:
    """One open-loop layer: signed pulse counts, applied as the tiles report."""

    def __init__(self, layer: AnalogLayer, agree: Agree | None = None) -> None:
        self.layers, self.agree = [layer], agree
        self.size = layer.weight.numel()

    def program(self, weights: torch.Tensor, steps: torch.Tensor) -> Outcome:
        layer = self.layers[0]
        counts = torch.zeros(self.size, dtype=torch.int64).index_put_((weights,), steps)
        pulses = layer.mapping.program_pulses(counts.view_as(layer.weight)).reshape(-1)[weights]
        if self.agree is not None:
            pulses = self.agree(pulses)
        applied = pulses * layer.granularity
        return applied, pulses != 0, lambda: layer.weight.view(-1).index_add_(0, weights, applied)


def _restacked(places: torch.Tensor, per_tile: int, positions: list[int]) -> torch.Tensor:
    """Flat device indices into a layer's own stack of tiles as indices into a stack where its
    tile i is tile ``positions[i]``."""
    return torch.tensor(positions)[places.div(per_tile, rounding_mode="floor")].mul_(per_tile).add_(places % per_tile)


def _parts(layers: list[AnalogLayer]) -> list[list[AnalogLayer]]:
    """Write-verify layers grouped by tile spec and mapping config; each open-loop layer alone."""
    groups: list[list[AnalogLayer]] = []
    for layer in layers:
        mapping = layer.mapping
        for group in groups:
            other = group[0].mapping
            if layer.levels is not None and group[0].levels is not None and (
                    other.spec == mapping.spec and other.config == mapping.config):
                group.append(layer)
                break
        else:
            groups.append([layer])
    return groups


def join_flat(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``parts`` end to end in one new flat tensor, and views of it shaped like each part: what
    lets a step read and write many layers' tensors in one operation."""
    flat = torch.cat([part.reshape(-1) for part in parts])
    return flat, [piece.view_as(part) for piece, part in zip(flat.split([part.numel() for part in parts]), parts)]


def _split(owners: list, indices: torch.Tensor, values: torch.Tensor, ends: torch.Tensor):
    """(owner, its indices counted from its own start, their values) for every owner of a
    range of the flat index; ``indices`` sorted, ``ends`` each owner's end."""
    if len(owners) == 1:
        return [(owners[0], indices, values)]
    cuts = [0, *torch.searchsorted(indices, ends).tolist()]
    starts = [0, *ends[:-1].tolist()]
    return [(owner, indices[a:b] - start, values[a:b]) for owner, start, a, b in zip(owners, starts, cuts, cuts[1:])]
