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


class DeviceArray:
    """``rows x cols`` devices; ``g`` holds the true conductances (uS), unseen by the host.

    ``g`` lives in a tensor the array is given (a board keeps every array's conductances in
    one tensor, so a layer's tiles are one slice of it) or else its own; it stays the same
    tensor, and every change writes into it and counts in ``g_changes`` (of all arrays), so
    whoever keeps something derived from conductances (a tile's G - G_ref) knows it is current
    while that count stands. ``state_loads`` counts the loads that replace the fixed
    parameters (bounds, stuck flags) the same way.
    """

    g_changes = 0
    state_loads = 0

    @property
    def g(self) -> torch.Tensor:
        return self._g

    @g.setter
    def g(self, value: torch.Tensor) -> None:
        self._g.copy_(value)
        DeviceArray.g_changes += 1

    def __init__(
        self, config: DeviceConfig, rows: int, cols: int, generator: torch.Generator, storage: torch.Tensor | None = None
    ) -> None:
        """Parameters are drawn from ``generator``, on its device (CPU or CUDA); ``storage``
        (rows, cols), if given, is where the conductances live."""
        self.config = config
        self.generator = generator
        self.shape = (rows, cols)
        self._g = torch.empty(self.shape, device=generator.device) if storage is None else storage
        span = config.range_us
        self.g_min = config.g_min_us + config.g_min_us * config.bounds_d2d * self._randn()
        self.g_max = config.g_max_us + config.g_max_us * config.bounds_d2d * self._randn()
        # Variation must never invert a device's range: keep at least half the nominal span.
        self.g_max = torch.maximum(self.g_max, self.g_min + 0.5 * span)
        self.a_up = config.step_up_us * (1 + config.step_d2d * self._randn()).clamp(min=0.1)
        self.a_down = config.step_down_us * (1 + config.step_d2d * self._randn()).clamp(min=0.1)
        self.stuck = self._rand() < config.stuck_fraction
        stuck_at = self.g_min + (self.g_max - self.g_min) * self._rand()
        # Pristine forming-free devices sit in their high-resistance state.
        self.g = torch.where(self.stuck, stuck_at, self.g_min)

    def _randn(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.generator.device)

    def _rand(self) -> torch.Tensor:
        return torch.rand(self.shape, generator=self.generator, device=self.generator.device)

    STATE = ("g", "g_min", "g_max", "a_up", "a_down", "stuck")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in self.STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.STATE:
            setattr(self, name, state[name].to(self.g.device).clone())
        DeviceArray.state_loads += 1

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
