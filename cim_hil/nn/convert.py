"""Turn an ordinary torch model into its analog version on a board's tiles."""

from __future__ import annotations

import copy

from torch import nn

from cim_hil.board import Board
from cim_hil.errors import PlacementError
from cim_hil.nn.config import MappingConfig
from cim_hil.nn.layers import AnalogConv2d, AnalogLayer, AnalogLinear
from cim_hil.nn.placement import Placement, layer_shapes, plan_placement
from cim_hil.nn.store import WeightStore


def count_tiles(model: nn.Module, rows: int, cols: int, pack: bool = False) -> int:
    """How many rows x cols tiles the Linear and Conv2d layers of ``model`` need (one block
    per tile, or packed)."""
    return plan_placement(model, rows, cols, pack=pack).tiles_used


def convert_to_analog(
    model: nn.Module, board: Board, config: MappingConfig | None = None, placement: Placement | None = None,
    layer_configs: dict[str, MappingConfig] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose Linear and Conv2d layers run on ``board``'s tiles where
    ``placement`` puts them (default: one block per tile, in module order); layers the plan
    keeps on the host stay as they are. The initial weights are programmed with write-verify.
    ``layer_configs`` overrides ``config`` for the layers it names (module names, as
    ``named_modules`` gives them). The analog layers' weights are views of a
    :class:`~cim_hil.nn.store.WeightStore`, one for the layers of each mapping config, which the
    mixed-precision optimizer programs in one go."""
    config = config or MappingConfig()
    layer_configs = layer_configs or {}
    spec = board[0].spec
    if placement is None:
        placement = plan_placement(model, spec.rows, spec.cols, pack=False, tiles=len(board), where=f"the board at {board.url}")
    elif (placement.rows, placement.cols) != (spec.rows, spec.cols):
        raise PlacementError(f"the placement is for tiles of {placement.rows}x{placement.cols}, the board at "
                             f"{board.url} has {spec.rows}x{spec.cols}")
    elif placement.tiles_used > len(board):
        raise PlacementError(f"the placement uses {placement.tiles_used} tiles, the board at {board.url} has {len(board)}")
    if [shape.name for shape in placement.layers] != [shape.name for shape in layer_shapes(model)]:
        raise PlacementError("the placement was made for another model (its layers differ)")
    analog = copy.deepcopy(model)
    converted = [(name, m) for name, m in analog.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in placement.host]
    if not converted:
        return analog
    shapes = {shape.name: shape for shape in placement.layers}
    configs = {name: layer_configs.get(name, config) for name, _ in converted}
    by_config: dict[str, list[str]] = {}  # the layers of each config, in module order
    for name, _ in converted:
        by_config.setdefault(configs[name].model_dump_json(), []).append(name)
    whole = board.group(board.tiles[: placement.tiles_used])
    parts = {}
    for names in by_config.values():
        store = WeightStore(whole, [(shapes[name].outputs, shapes[name].inputs) for name in names],
                            levels=configs[names[0]].programming == "write_verify")
        parts.update({name: store.part(index) for index, name in enumerate(names)})
    for name, module in converted:
        blocks = placement.blocks_of(name)
        tile_indices = list(dict.fromkeys(block.tile for block in blocks))  # distinct, in order of first use
        spots = [(tile_indices.index(block.tile), block.row, block.col) for block in blocks]
        layer_type = AnalogLinear if isinstance(module, nn.Linear) else AnalogConv2d
        group = board.group([board.tiles[i] for i in tile_indices])
        _replace(analog, name, layer_type(module, group, configs[name], spots, not placement.shares_tiles(name),
                                          parts[name]))
    return analog


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def analog_layers(model: nn.Module) -> list[AnalogLayer]:
    return [m for m in model.modules() if isinstance(m, AnalogLayer)]
