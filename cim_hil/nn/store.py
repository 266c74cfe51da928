"""The host's copy of a model's analog weights: one flat tensor per quantity, layer after layer.

``convert_to_analog`` makes one store for a model; every analog layer's ``weight`` and
``levels`` are views of it from the start, so a training step reads and writes every layer's
weights in one tensor operation, and nothing ever has to be joined again. What a step needs
per weight is here too: where its devices sit in the store's group of tiles (``places``),
what one level and one programming step (epsilon) weigh.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cim_hil.group import TileGroup

if TYPE_CHECKING:
    from cim_hil.nn.mapping import TileMapping


class WeightStore:
    """The analog weights of layers of the given ``shapes`` (out, in), end to end.

    ``group`` holds every layer's tiles; ``levels`` is None when the weights are programmed
    with open-loop pulses (the host then knows the nominal weights only). Layer i takes its
    views with :meth:`part` and fills them when it programs its devices.
    """

    def __init__(self, group: TileGroup, shapes: list[tuple[int, int]], levels: bool) -> None:
        self.group = group
        self.shapes = shapes
        self.sizes = [out * inputs for out, inputs in shapes]
        self.starts = list(itertools.accumulate(self.sizes, initial=0))
        size = self.starts[-1]
        self.weights = torch.zeros(size)
        self.levels = torch.zeros(size, dtype=torch.int64) if levels else None
        self.places = torch.zeros(size, dtype=torch.int64)
        self.level_weight = torch.zeros(size)
        self.granularity = torch.zeros(size)
        self.mappings: list[TileMapping | None] = [None] * len(shapes)

    def __len__(self) -> int:
        return self.starts[-1]

    def part(self, index: int) -> StoredLayer:
        return StoredLayer(self, index)

    def fill(self, index: int, mapping: TileMapping) -> None:
        """What layer ``index``'s ``mapping`` says of its weights: their places in the store's
        group, what a level and a step weigh."""
        span = slice(self.starts[index], self.starts[index + 1])
        per_tile = mapping.spec.rows * mapping.spec.cols
        position = {id(tile): at for at, tile in enumerate(self.group.tiles)}
        tiles = torch.tensor([position[id(tile)] for tile in mapping.tiles])
        index_in_layer = mapping.device_index.view(-1)
        tile_of = index_in_layer.div(per_tile, rounding_mode="floor")
        self.places[span] = tiles[tile_of] * per_tile + index_in_layer % per_tile
        self.level_weight[span] = mapping.weights_for(1)
        self.granularity[span] = mapping.granularity
        self.mappings[index] = mapping


@dataclass(frozen=True)
class StoredLayer:
    """Layer ``index`` of ``store``: its slice, and its weights and levels shaped (out, in)."""

    store: WeightStore
    index: int

    @property
    def span(self) -> slice:
        return slice(self.store.starts[self.index], self.store.starts[self.index + 1])

    @property
    def weights(self) -> torch.Tensor:
        return self.store.weights[self.span].view(self.store.shapes[self.index])

    @property
    def levels(self) -> torch.Tensor | None:
        levels = self.store.levels
        return None if levels is None else levels[self.span].view(self.store.shapes[self.index])
