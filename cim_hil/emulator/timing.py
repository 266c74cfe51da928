"""The cycle and energy model of the reference SoC; README's timing table lists each rule.

All counts are for one tile. Rows of the array are programmed and read one at a time;
the columns of one row work in parallel; a group of ``cols_per_adc`` outputs shares one ADC,
so converting all outputs takes that many conversion phases.
"""

from __future__ import annotations

import torch

from cim_hil.config import PeripheryConfig, TimingConfig

REFERENCE_AREA = 64 * 64  # the array the 2.66 nJ figure was measured on


class TimingModel:
    """Cycles and energy of one ``rows x cols`` tile's operations, from the clock-level
    ``timing`` and the ``periphery`` (bits, columns per ADC); the emulated tile counts with it."""

    def __init__(self, timing: TimingConfig, periphery: PeripheryConfig, rows: int, cols: int) -> None:
        self.t = timing
        self.p = periphery
        self.rows, self.cols = rows, cols
        self.area_factor = rows * cols / REFERENCE_AREA

    def _phases(self, outputs: int) -> int:
        return min(self.p.cols_per_adc, outputs)

    def product_cycles(self, batch: int, outputs: int) -> int:
        """Bit-serial product: per ADC phase, one pulse per input bit, then one conversion."""
        per_phase = self.p.input_bits * self.t.input_pulse_cycles + self.t.conversion_cycles
        return batch * self._phases(outputs) * per_phase

    def row_read_cycles(self, rows: int, width: int) -> int:
        """Reading conductances: per row, select it, then one 1-bit read pulse + conversion per phase."""
        per_phase = self.t.input_pulse_cycles + self.t.conversion_cycles
        return rows * (self.t.row_select_cycles + self._phases(width) * per_phase)

    def pulse_cycles(self, counts: torch.Tensor) -> int:
        """Per row with pulses: select it, then its longest SET train, then its longest RESET train."""
        longest_up = counts.clamp(min=0).amax(dim=1)
        longest_down = (-counts).clamp(min=0).amax(dim=1)
        busy_rows = int(((longest_up + longest_down) > 0).sum())
        pulse_slots = int((longest_up + longest_down).sum())
        return busy_rows * self.t.row_select_cycles + pulse_slots * self.t.program_pulse_cycles

    def verify_trial_cycles(self, rows_pending: int) -> int:
        """One write-verify trial on each pending row: select, one pulse, read the row back."""
        per_row = self.t.program_pulse_cycles + self.row_read_cycles(1, self.cols)
        return rows_pending * per_row

    def product_energy_nj(self, batch: int) -> float:
        return batch * self.t.energy_per_product_nj * self.area_factor

    def row_read_energy_nj(self, rows: int) -> float:
        # One 1-bit pulse instead of input_bits pulses, over one row instead of all (ours).
        share = 1 / (self.p.input_bits * self.rows)
        return rows * self.t.energy_per_product_nj * self.area_factor * share

    def pulse_energy_nj(self, pulses: int) -> float:
        return pulses * self.t.energy_per_pulse_nj
