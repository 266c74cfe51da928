"""The update of a pulse-programmed array: expected pulse counts, rounded stochastically.

A step's update dW of a device is dW / epsilon pulses of granularity epsilon on average. The
count applied is its floor plus one with probability the fractional part: unbiased, with the
least variance an integer count can have, and exactly what ``Tile.apply_pulses`` takes, one
signed count per device, on every backend. RPU arrays instead fire coincident stochastic pulse
trains on rows and columns (bit length BL); that needs a driver that pulses all rows and
columns at once, which the reference SoC (rows programmed one at a time) does not have, and
adds variance of order |dW| / epsilon for the same mean. Every applied pulse is counted.
"""

from __future__ import annotations

import torch


def stochastic_counts(expected: torch.Tensor, generator: torch.Generator, cap: int) -> torch.Tensor:
    """``expected`` pulse counts (any real values) as integer counts with the same mean, each
    within +-``cap``."""
    low = expected.floor()
    draw = torch.rand(expected.shape, generator=generator, dtype=expected.dtype)
    return low.add_(draw < expected - low).clamp_(-cap, cap).to(torch.int64)
