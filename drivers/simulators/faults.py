"""Line faults on purpose: dropped bytes, flipped bits, stalled answers, a pulled cable.

The virtual board applies a :class:`FaultPlan` to the bytes on its line, both ways, so the
host's retry and resynchronisation paths run against the same kinds of damage a real UART
cable does to them. Seeded, so a failing run can be replayed.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from cim_hil.config import Strict


class FaultPlan(Strict):

    drop_byte_rate: float = Field(0.0, ge=0.0, lt=1.0, description="chance each byte is lost, either way")
    flip_bit_rate: float = Field(0.0, ge=0.0, lt=1.0, description="chance each byte has one bit flipped")
    stall_rate: float = Field(0.0, ge=0.0, le=1.0, description="chance an answer is held back stall_s")
    stall_s: float = Field(0.3, ge=0.0, description="how long a stalled answer is held back")
    hang_up_after_answers: int | None = Field(None, ge=0, description="pull the cable after this many answers")
    seed: int = Field(0, ge=0)


class LineFaults:
    """Applies a plan to byte strings, with its own random stream."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._random = np.random.default_rng(plan.seed)
        self.bytes_dropped = 0
        self.bits_flipped = 0
        self.stalls = 0

    def damage(self, data: bytes) -> bytes:
        """``data`` as the far end receives it."""
        if not (self.plan.drop_byte_rate or self.plan.flip_bit_rate) or not data:
            return data
        values = np.frombuffer(data, dtype=np.uint8).copy()
        flips = self._random.random(values.size) < self.plan.flip_bit_rate
        values[flips] ^= (1 << self._random.integers(0, 8, int(flips.sum()))).astype(np.uint8)
        keep = self._random.random(values.size) >= self.plan.drop_byte_rate
        self.bits_flipped += int(flips.sum())
        self.bytes_dropped += int((~keep).sum())
        return values[keep].tobytes()

    def stall_s(self) -> float:
        """How long to hold back the next answer (0 for most)."""
        if self.plan.stall_rate and self._random.random() < self.plan.stall_rate:
            self.stalls += 1
            return self.plan.stall_s
        return 0.0
