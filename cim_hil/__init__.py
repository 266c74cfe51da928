"""cim-hil: train neural networks on memristor compute-in-memory tiles with the host in the loop.

The names below load on first use (PEP 562), so ``import cim_hil.cli`` is instant and the
command can catch a Ctrl-C that comes while torch is still loading.
"""

from importlib import import_module

_HOMES = {
    "Board": "cim_hil.board",
    "open_board": "cim_hil.board",
    "EmulatorConfig": "cim_hil.config",
    "load_config": "cim_hil.config",
    "CimHilError": "cim_hil.errors",
    "Capability": "cim_hil.tile",
    "Counters": "cim_hil.tile",
    "ProgramResult": "cim_hil.tile",
    "Tile": "cim_hil.tile",
    "TileSpec": "cim_hil.tile",
}
__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'cim_hil' has no attribute {name!r}")
