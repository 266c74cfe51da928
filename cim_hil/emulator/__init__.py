"""The cycle-accurate emulator of the reference SoC (the reference implementation of its commands)."""

from cim_hil.emulator.board import build_emulator
from cim_hil.emulator.tile import EmulatedTile

__all__ = ["EmulatedTile", "build_emulator"]
