"""Device physics of one array of memristors: soft-bounds pulses, write-verify trials, reads.

Each device draws its own parameters (device-to-device variation) once, from the array's
generator, so the same seed gives the same chip. The pulse response is the soft-bounds model
of ../shared/DOMAIN.md, applied one pulse at a time so alternating up/down pulses behave
exactly as on the bench.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cim_hil.config import DeviceConfig
from cim_hil.emulator.store import STATE, DeviceStore


class DeviceArray:
    """``rows x cols`` devices; ``g`` holds the true conductances (uS), unseen by the host.

    Every quantity of the array is a view of a :class:`~cim_hil.emulator.store.DeviceStore`
    (a board keeps all its tiles' devices in one, so a group of tiles is one slice of it), and
    stays that view: writes go into it in place, and the store's version tells whoever keeps
    something derived from conductances that it changed.
    """

    def __init__(
        self, config: DeviceConfig, rows: int, cols: int, generator: torch.Generator,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Parameters are drawn from ``generator``, on its device (CPU or CUDA), into ``state``
        (views (rows, cols) of a store, one per name in ``STATE``; else a store of its own)."""
        self.config = config
        self.generator = generator
        self._state = state = state or DeviceStore(1, rows, cols, generator.device).views(0, 0)
        self.shape = (rows, cols)
        span = config.range_us
        g_min = config.g_min_us + config.g_min_us * config.bounds_d2d * self._randn()
        g_max = config.g_max_us + config.g_max_us * config.bounds_d2d * self._randn()
        # Variation must never invert a device's range: keep at least half the nominal span.
        state["g_min"].copy_(g_min)
        state["g_max"].copy_(torch.maximum(g_max, g_min + 0.5 * span))
        state["a_up"].copy_(config.step_up_us * (1 + config.step_d2d * self._randn()).clamp(min=0.1))
        state["a_down"].copy_(config.step_down_us * (1 + config.step_d2d * self._randn()).clamp(min=0.1))
        state["stuck"].copy_(self._rand() < config.stuck_fraction)
        stuck_at = self.g_min + (self.g_max - self.g_min) * self._rand()
        # Pristine forming-free devices sit in their high-resistance state.
        self.g = torch.where(self.stuck, stuck_at, self.g_min)

    @property
    def g(self) -> torch.Tensor:
        return self._state["g"]

    @g.setter
    def g(self, value: torch.Tensor) -> None:
        self._state["g"].copy_(value)

    g_min = property(lambda self: self._state["g_min"])
    g_max = property(lambda self: self._state["g_max"])
    a_up = property(lambda self: self._state["a_up"])
    a_down = property(lambda self: self._state["a_down"])
    stuck = property(lambda self: self._state["stuck"])

    def _randn(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.generator.device)

    def _rand(self) -> torch.Tensor:
        return torch.rand(self.shape, generator=self.generator, device=self.generator.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self._state[name].clone() for name in STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in STATE:
            self._state[name].copy_(state[name])

    def symmetry_point(self) -> torch.Tensor:
        """G* where an up and a down step cancel on average (analytic, for tests and reports)."""
        return (self.a_up * self.g_max + self.a_down * self.g_min) / (self.a_up + self.a_down)

    def pulse(self, counts: torch.Tensor) -> None:
        """Apply signed pulse counts, one pulse per step so every pulse sees the present state.

        Up:   dG = a_up   * (G_max - G) / (G_max - G_min)
        Down: dG = a_down * (G_min - G) / (G_max - G_min)
        so both are (bound - G) * rate, with the bound and rate chosen by the pulse's sign.
        """
        remaining = counts.abs()
        going_up = counts > 0
        bound = torch.where(going_up, self.g_max, self.g_min)
        rate = torch.where(going_up, self.a_up, self.a_down) / (self.g_max - self.g_min)
        movable = ~self.stuck
        c2c = self.config.step_c2c
        for k in range(int(remaining.max()) if remaining.numel() else 0):
            step = (bound - self.g).mul_(rate)
            if c2c:
                step.mul_(self._randn().mul_(c2c).add_(1))
            moved = step.add_(self.g).clamp_(self.g_min, self.g_max)
            self.g = torch.where((remaining > k) & movable, moved, self.g)

    def read(self, noise_us: float) -> torch.Tensor:
        """One read of every device with fresh read noise."""
        return self.g + noise_us * self._randn() if noise_us else self.g.clone()


def write_verify_trials(
    g: torch.Tensor, g_min: torch.Tensor, g_max: torch.Tensor, stuck: torch.Tensor, targets: torch.Tensor,
    errors: torch.Tensor, read_noise: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor],
    tolerance_us: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write-verify of n devices (flat tensors of their state and targets), all trials at once.

    Trial t lands each device at target + ``errors[t]`` (within its bounds; a stuck device
    stays put) and reads it back with ``read_noise[t]`` through ``convert``; a device stops at
    its first read within ``tolerance_us``. The trials are independent, so drawing them all up
    front ((trials, n) each) and keeping each device's first accepted trial is exactly the
    trial-by-trial loop. Returns the new conductances, the accepted (else last) reads, the
    trials each device took, and which devices failed.
    """
    landed = torch.where(stuck, g, (targets + errors).clamp_(g_min, g_max))  # bounds never cross (g_max > g_min)
    reads = convert(landed + read_noise)
    accepted = (reads - targets).abs_() <= tolerance_us
    passed, first = accepted.to(torch.uint8).max(dim=0)  # the first maximum's index: first accepted trial
    passed = passed.bool()
    last = torch.where(passed, first, len(accepted) - 1).unsqueeze(0)
    return landed.gather(0, last)[0], reads.gather(0, last)[0], last[0] + 1, ~passed
