"""The optimizer of each ``--algorithm``, with A's tiles found and prepared on the board."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cim_hil.board import Board
from cim_hil.errors import ConfigError
from cim_hil.nn.convert import analog_layers
from cim_hil.tile import Tile
from cim_hil.training.algorithms.analog_sgd import AnalogSGD
from cim_hil.training.algorithms.config import TRANSFER, AlgorithmConfig
from cim_hil.training.algorithms.fast_array import FastArray
from cim_hil.training.algorithms.no_accumulation import NoAccumulationOptimizer
from cim_hil.training.algorithms.transfer import TransferOptimizer
from cim_hil.training.optimizer import MixedPrecisionOptimizer

Calibrate = Callable[[Tile], object]
"""Zero-shifts one tile: symmetry-point search, then references there (``calibration.calibrate_references``)."""


def tiles_in_use(model: nn.Module, board: Board) -> int:
    """How many of the board's first tiles the model's analog layers reach into."""
    where = {id(tile): index for index, tile in enumerate(board.tiles)}
    used = [where[id(tile)] for layer in analog_layers(model) for tile in layer.mapping.tiles]
    return max(used) + 1 if used else 0


def fast_arrays_beside(model: nn.Module, board: Board) -> list[FastArray]:
    """A for every analog layer, on the tiles just after the model's: A of a layer on tile i
    lies on tile i + (tiles the model uses), at the same places (packed layers stay packed)."""
    offset = tiles_in_use(model, board)
    if 2 * offset > len(board):
        raise ConfigError(f"the transfer algorithms put A beside C: {2 * offset} tiles needed, the board at "
                          f"{board.url} has {len(board)} (for the emulator: emulator:?tiles={2 * offset})")
    where = {id(tile): index for index, tile in enumerate(board.tiles)}
    return [FastArray(layer, [board.tiles[where[id(tile)] + offset] for tile in layer.mapping.tiles])
            for layer in analog_layers(model)]


def build_optimizer(algorithm: str, model: nn.Module, board: Board, lr: float, rule: str = "sgd",
                    options: AlgorithmConfig | None = None, seed: int = 0,
                    calibrate: Calibrate | None = None, agree=None) -> torch.optim.Optimizer:
    """The optimizer for ``algorithm`` over ``model`` (converted onto ``board``). TTv2 and
    c-TTv2 zero-shift A's tiles with ``calibrate`` first: A's references at the symmetry points.
    ``agree``: the data-parallel ranks' agreement on chi (mixed precision only)."""
    options = options or AlgorithmConfig()
    if algorithm == "mp":
        return MixedPrecisionOptimizer(model, lr=lr, rule=rule, agree=agree)
    if algorithm == "mp-no-accumulation":
        return NoAccumulationOptimizer(model, lr=lr, rule=rule, agree=agree)
    if algorithm == "sgd":
        return AnalogSGD(model, lr=lr, options=options, seed=seed)
    if algorithm not in TRANSFER:
        raise ConfigError(f"unknown algorithm {algorithm!r}")
    arrays = fast_arrays_beside(model, board)
    if algorithm != "agad":
        if calibrate is None:
            raise ConfigError(f"{algorithm} needs A's references at the symmetry points: give a calibrate function "
                              "(calibration.calibrate_references)")
        for tile in {id(tile): tile for array in arrays for tile in array.tiles}.values():
            calibrate(tile)
    return TransferOptimizer(model, arrays, lr=lr, algorithm=algorithm, options=options, seed=seed)
