"""Turn an ordinary torch model into its analog version on a board's tiles."""

from __future__ import annotations

import copy

from torch import nn

from cim_hil.board import Board
from cim_hil.errors import CimHilError
from cim_hil.nn.config import MappingConfig
from cim_hil.nn.layers import AnalogConv2d, AnalogLayer, AnalogLinear
from cim_hil.nn.mapping import tiles_needed
from cim_hil.nn.store import WeightStore


def _shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels


def _convertible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def count_tiles(model: nn.Module, rows: int, cols: int) -> int:
    """How many rows x cols tiles the Linear and Conv2d layers of ``model`` need."""
    return sum(tiles_needed(*_shape(m), rows, cols) for _, m in _convertible(model))


def convert_to_analog(model: nn.Module, board: Board, config: MappingConfig | None = None) -> nn.Module:
    """A copy of ``model`` whose Linear and Conv2d layers run on ``board``'s tiles, one block per
    tile, in module order. The initial weights are programmed with write-verify. The analog
    layers' weights are views of one :class:`~cim_hil.nn.store.WeightStore`, which the
    mixed-precision optimizer programs in one go."""
    config = config or MappingConfig()
    spec = board[0].spec
    needed = count_tiles(model, spec.rows, spec.cols)
    if needed > len(board):
        raise CimHilError(
            f"the model needs {needed} tiles of {spec.rows}x{spec.cols}, the board at {board.url} "
            f"has {len(board)}; use a board with at least {needed} tiles "
            f"(for the emulator: emulator:?tiles={needed})"
        )
    analog = copy.deepcopy(model)
    convertible = _convertible(analog)
    if not convertible:
        return analog
    shapes = [_shape(module) for _, module in convertible]
    store = WeightStore(board.group(board.tiles[:needed]), [(out, inputs) for inputs, out in shapes],
                        levels=config.programming == "write_verify")
    next_tile = 0
    for index, ((name, module), shape) in enumerate(zip(convertible, shapes)):
        count = tiles_needed(*shape, spec.rows, spec.cols)
        group = board.group(board.tiles[next_tile : next_tile + count])
        next_tile += count
        layer_type = AnalogLinear if isinstance(module, nn.Linear) else AnalogConv2d
        _replace(analog, name, layer_type(module, group, config, store.part(index)))
    return analog


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def analog_layers(model: nn.Module) -> list[AnalogLayer]:
    return [m for m in model.modules() if isinstance(m, AnalogLayer)]
