"""Where an emulated board's device state lives: one tensor per quantity for all its tiles.

Each quantity (true conductance, bounds, step sizes, stuck flags) is one tensor of shape
(tiles, 2, rows, cols): [t, 0] are tile t's weight devices, [t, 1] its reference devices. The
arrays of devices are views of it, so a group of tiles can work on all of theirs in one tensor
operation, and a run of consecutive tiles is one slice.
"""

from __future__ import annotations

import torch

STATE = ("g", "g_min", "g_max", "a_up", "a_down", "stuck")


class DeviceStore:
    """The device state of ``tiles`` tiles of ``rows x cols``, on ``device``."""

    def __init__(self, tiles: int, rows: int, cols: int, device: torch.device) -> None:
        shape = (tiles, 2, rows, cols)
        with torch.inference_mode(False):  # tensors that keep a version counter (see ``version``)
            self.g = torch.zeros(shape, device=device)
            self.g_min, self.g_max = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
            self.a_up, self.a_down = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
            self.stuck = torch.zeros(shape, dtype=torch.bool, device=device)

    @property
    def version(self) -> int:
        """Changes with every write of a conductance. It is torch's version counter of ``g``,
        which every in-place write through any view of it moves (a setter's copy, an
        ``index_copy_``, ``g[3, 5] = x``), so whatever is derived from conductances (a group's
        G - G_ref) can tell whether it is current, however the write was made."""
        return self.g._version

    def views(self, tile: int, half: int) -> dict[str, torch.Tensor]:
        """Every quantity of one array: tile ``tile``'s weight (``half`` 0) or reference (1) devices."""
        return {name: getattr(self, name)[tile, half] for name in STATE}
