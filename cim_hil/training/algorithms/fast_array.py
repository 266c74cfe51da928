"""The fast array A of the Tiki-Taka family, on tiles of its own.

A is laid out as its layer's weights C are (the same places on as many tiles, the same weight
per uS), so A's column k (the weights of input k) lies on one row of each tile of that input's
row block, and reading it is one row read per tile (``Tile.read_conductances`` with a window): a
1-bit read pulse per row, far finer than a one-hot product through an ADC whose full scale is
set for whole columns of inputs. What A holds relative to its references is
W_A = (G - G_ref) * scale; the reference devices are read once, averaged, when the algorithm
starts (TTv2 and c-TTv2), or not at all (AGAD, which needs none).
"""

from __future__ import annotations

import torch

from cim_hil.errors import ConfigError
from cim_hil.nn.convert import analog_layers
from cim_hil.nn.layers import AnalogLayer
from cim_hil.tile import Tile, averaged_read


class FastArray:
    def __init__(self, layer: AnalogLayer, tiles: list[Tile]) -> None:
        mapping = layer.mapping
        if len(tiles) != len(mapping.tiles):
            raise ConfigError(f"A needs {len(mapping.tiles)} tiles for its layer, got {len(tiles)}")
        if any(tile.spec != mapping.spec for tile in tiles):
            raise ConfigError("A's tiles must share the spec of the layer's tiles")
        self.layer, self.tiles = layer, tiles
        self.rows, self.cols = mapping.spec.rows, mapping.spec.cols
        self.scale = mapping.scale  # weight per uS, as the layer's
        self.granularity = layer.granularity  # weight change of one nominal pulse

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.layer.weight.shape)  # type: ignore[return-value]

    def apply_pulses(self, counts: torch.Tensor) -> torch.Tensor:
        """Signed pulse counts (out, in) on A's devices; returns what the tiles applied."""
        return self.layer.mapping.program_pulses(counts, self.tiles)

    def read_columns(self, columns: list[int]) -> torch.Tensor:
        """One read (uS) of A's columns ``columns``: (out, len(columns)). Input k's weights sit
        on one row of each tile of its row block (wherever the placement put the blocks): one
        row read per tile."""
        index = self.layer.mapping.device_index  # (out, in): flat places in the stack of tiles
        per_tile = self.rows * self.cols
        reads = []
        for k in columns:
            places = index[:, k]
            tile, row, col = places // per_tile, places // self.cols % self.rows, places % self.cols
            column = torch.empty(len(places))
            for t in tile.unique().tolist():
                on = tile == t
                r, c = int(row[on][0]), col[on]
                first, last = int(c.min()), int(c.max()) + 1
                read = self.tiles[t].read_conductances((r, r + 1, first, last))[0].float().cpu()
                column[on] = read[c - first]
            reads.append(column)
        return torch.stack(reads, dim=1)

    def read_references(self, reads: int) -> torch.Tensor:
        """A's reference devices (uS), (out, in), each the mean of ``reads`` reads."""
        stacked = torch.stack([averaged_read(tile.read_reference, reads) for tile in self.tiles])
        return self.layer.mapping.from_tiles(stacked)

    def settle(self, pairs: int) -> None:
        """Alternating up/down pulses on every device: each decays to its symmetry point, where
        its up and down steps match (no reads, no reference needed)."""
        pulse = torch.ones(self.rows, self.cols, dtype=torch.int64)
        for _ in range(pairs):
            for tile in self.tiles:
                tile.apply_pulses(pulse)
                tile.apply_pulses(-pulse)


def fast_arrays(model: torch.nn.Module, tiles: list[Tile]) -> list[FastArray]:
    """An A for every analog layer of ``model``, on ``tiles`` in the model's order (as many as
    the model's layers use)."""
    arrays, first = [], 0
    for layer in analog_layers(model):
        count = len(layer.mapping.tiles)
        if first + count > len(tiles):
            raise ConfigError(f"A needs {sum(len(l.mapping.tiles) for l in analog_layers(model))} tiles beside the "
                              f"model's, the board has {len(tiles)} to spare")
        arrays.append(FastArray(layer, tiles[first : first + count]))
        first += count
    return arrays
