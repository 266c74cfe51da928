"""Where an emulated board's device state lives: one tensor per quantity for all its tiles.

Each quantity (true conductance, bounds, step sizes, stuck flags) is one tensor of shape
(tiles, 2, rows, cols): [t, 0] are tile t's weight devices, [t, 1] its reference devices. The
arrays of devices are views of it, so a group of tiles can work on all of theirs in one tensor
operation, and a run of consecutive tiles is one slice.

The store also keeps the board's idle clock and each device's age since it was last written,
which conductance relaxation (:mod:`cim_hil.emulator.relaxation`) moves devices by.
"""

from __future__ import annotations

from collections.abc import Callable

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
        self.clock_s = 0.0  # seconds let pass on this board (``pass_time``); programming takes none of it
        # Made at the first wait, so a board that never waits holds nothing more:
        self._written_at: torch.Tensor | None = None  # each device's clock at its last write
        self._settled: torch.Tensor | None = None  # the conductances the last wait left

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

    def pass_time(self, seconds: float, move: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]) -> None:
        """Let ``seconds`` pass: ``move(age_before, age_after)`` (each device's seconds since its
        last write, before and after the wait) gives the conductances after it, or None for
        unchanged. A device counts as written when its conductance is not what the last wait
        left, so every write path (a setter's copy, a group's ``index_copy_``, a loaded state)
        restarts its age without telling the store; before the first wait every device was
        written at clock 0."""
        if self._written_at is None:
            self._written_at = torch.zeros_like(self.g)
        else:
            self._written_at.masked_fill_(self.g != self._settled, self.clock_s)
        before = self._written_at.neg().add_(self.clock_s)
        moved = move(before, before + seconds)
        if moved is not None:
            self.g.copy_(moved)
        self.clock_s += seconds
        self._settled = self.g.clone()
