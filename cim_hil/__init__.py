"""cim-hil: train neural networks on memristor compute-in-memory tiles with the host in the loop."""

from cim_hil.board import Board, open_board
from cim_hil.config import EmulatorConfig, load_config
from cim_hil.errors import CimHilError
from cim_hil.tile import Capability, Counters, ProgramResult, Tile, TileSpec

__all__ = [
    "Board",
    "Capability",
    "CimHilError",
    "Counters",
    "EmulatorConfig",
    "ProgramResult",
    "Tile",
    "TileSpec",
    "load_config",
    "open_board",
]
__version__ = "0.1.0"
