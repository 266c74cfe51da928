"""A small crossbar on a probe station, behind the Tile interface: an SMU and a switch matrix.

``open_board("TCPIP0::10.0.0.5::5025::SOCKET", InstrumentBoardConfig(matrix_resource=...))``
(or ``visa:TCPIP0::...``: a bare VISA resource name has the ``visa`` scheme) opens the SMU named by the URL (driver chosen by its ``*IDN?``) and the matrix, and gives one
:class:`InstrumentTile`. It reads conductances device by device (DC current at the read
voltage), applies SET/RESET pulse trains and programs with verify by pulsing one step at a time
towards the target. It has no analog periphery: its products are computed on the host from a
conductance read, and its capabilities say so (``computed_products``, not ``analog_products``),
so the trainer refuses it while calibration runs on it unchanged.
"""

from __future__ import annotations

import pyvisa
import torch
from pydantic import Field

from cim_hil.board import Board
from cim_hil.config import ConductanceRange
from cim_hil.errors import BoardError, ConfigError
from cim_hil.tile import Capability, Counters, ProgramResult, Tile, TileSpec, Window
from drivers.instruments import SafetyLimits, SourceMeasureUnit, SwitchMatrix, open_resource, open_smu

HOST_FLOAT_BITS = 24  # products are host arithmetic on float32 reads: a 24-bit mantissa


class InstrumentBoardConfig(ConductanceRange):
    """The array on the probe station, how to drive it, and where its instruments are."""

    matrix_resource: str = Field(description="VISA resource of the switch matrix")
    visa_library: str = Field("@py", description="pyvisa backend: '@py' (pyvisa-py), '<file>.yaml@sim', or a VISA path")
    timeout_ms: int = Field(2000, ge=1, description="VISA timeout for each answer")
    rows: int = Field(4, ge=1)
    cols: int = Field(4, ge=1)
    g_min_us: float = Field(7.6, gt=0.0, description="lowest conductance write-verify may aim for")
    g_max_us: float = Field(31.3, gt=0.0, description="highest conductance write-verify may aim for")
    levels: int = Field(16, ge=2, description="programmable levels in [g_min_us, g_max_us]")
    read_voltage_v: float = Field(0.1, gt=0.0)
    read_compliance_a: float = Field(1e-4, gt=0.0)
    set_voltage_v: float = Field(1.2, gt=0.0, description="SET (conductance up) pulse amplitude")
    reset_voltage_v: float = Field(-1.2, lt=0.0, description="RESET (conductance down) pulse amplitude")
    pulse_width_s: float = Field(100e-6, gt=0.0)
    pulse_compliance_a: float = Field(5e-4, gt=0.0)
    tolerance_us: float = Field(0.8, gt=0.0, description="default write-verify tolerance")
    max_trials: int = Field(60, ge=1, description="default write-verify budget, in pulses per device")
    max_pulses_per_call: int = Field(1000, ge=1)
    limits: SafetyLimits = SafetyLimits()


class InstrumentTile(Tile):
    """A rows x cols crossbar reached one device at a time through a switch matrix."""

    def __init__(self, smu: SourceMeasureUnit, matrix: SwitchMatrix, config: InstrumentBoardConfig) -> None:
        self.smu, self.matrix, self.config = smu, matrix, config
        self.spec = TileSpec(
            rows=config.rows, cols=config.cols, input_bits=HOST_FLOAT_BITS, output_bits=HOST_FLOAT_BITS,
            g_min_us=config.g_min_us, g_max_us=config.g_max_us, levels=config.levels, v_read=config.read_voltage_v,
            max_pulses_per_call=min(config.max_pulses_per_call, config.limits.max_pulses_per_command),
            default_tolerance_us=config.tolerance_us, default_max_trials=config.max_trials,
            capabilities=frozenset({Capability.COMPUTED_PRODUCTS, Capability.PULSES, Capability.WRITE_VERIFY}),
        )
        # No periphery clock: counters count operations; time on the bench is the user's wall clock.
        self.counters = Counters(clock_hz=1.0)
        self.reference_us = (config.g_min_us + config.g_max_us) / 2

    # ---- one device ---------------------------------------------------------------------------
    # Routing and driving one device is one transaction over both instruments (always locked in
    # this order), so another thread never re-routes the matrix between the two.
    def _read_device(self, row: int, col: int) -> float:
        with self.matrix.lock, self.smu.lock:
            self.matrix.connect(row, col)
            amps = self.smu.measure_current(self.config.read_voltage_v, self.config.read_compliance_a)
            self.counters.device_reads += 1
        return amps / self.config.read_voltage_v * 1e6

    def _pulse_device(self, row: int, col: int, count: int) -> None:
        amplitude = self.config.set_voltage_v if count > 0 else self.config.reset_voltage_v
        with self.matrix.lock, self.smu.lock:
            self.matrix.connect(row, col)
            self.smu.pulse(amplitude, self.config.pulse_width_s, abs(count), self.config.pulse_compliance_a)
            self.counters.pulses += abs(count)

    # ---- Tile operations ----------------------------------------------------------------------
    def _read_conductances(self, window: Window) -> torch.Tensor:
        r0, r1, c0, c1 = window
        return torch.tensor([[self._read_device(r, c) for c in range(c0, c1)] for r in range(r0, r1)])

    def _apply_pulses(self, counts: torch.Tensor) -> torch.Tensor:
        applied = torch.zeros_like(counts)
        for row, col in counts.nonzero().tolist():
            self._pulse_device(row, col, int(counts[row, col]))
            applied[row, col] = counts[row, col]  # recorded only once the train went out
        return applied

    def _program_verify(self, targets, mask, tolerance_us, max_trials, reference) -> ProgramResult:
        """Per device: read, and while outside the tolerance, one pulse towards the target."""
        reached = torch.full(targets.shape, float("nan"))
        trials = torch.zeros(targets.shape, dtype=torch.int64)
        failed = torch.zeros(targets.shape, dtype=torch.bool)
        for row, col in mask.nonzero().tolist():
            target = float(targets[row, col])
            value = self._read_device(row, col)
            while abs(value - target) > tolerance_us and trials[row, col] < max_trials:
                self._pulse_device(row, col, 1 if value < target else -1)
                trials[row, col] += 1
                value = self._read_device(row, col)
            reached[row, col] = value
            failed[row, col] = abs(value - target) > tolerance_us
            trials[row, col] = max(int(trials[row, col]), 1)  # the read counts as the verify of trial 1
        self.counters.verify_trials += int(trials.sum())
        return ProgramResult(reached_us=reached, trials=trials, failed=failed, tolerance_us=tolerance_us)

    def _forward(self, x: torch.Tensor, outputs: int) -> torch.Tensor:
        rows = x.shape[1]
        weights = self.read_conductances((0, rows, 0, outputs)) - self.reference_us
        self.counters.products += len(x)
        return self.spec.v_read * (x.float() @ weights)


class InstrumentBoard(Board):
    def __init__(self, tile: InstrumentTile, url: str) -> None:
        smu, matrix = tile.smu.identity, tile.matrix.identity
        super().__init__([tile], url, {
            "backend": "visa",
            "smu": f"{smu.maker} {smu.model} ({smu.serial}, firmware {smu.firmware})",
            "matrix": f"{matrix.maker} {matrix.model} ({matrix.serial}, firmware {matrix.firmware})",
        })

    def close(self) -> None:
        tile: InstrumentTile = self.tiles[0]
        tile.smu.close()
        tile.matrix.close()


def open_instrument_board(url: str, config: InstrumentBoardConfig | None) -> InstrumentBoard:
    """The ``visa`` scheme's opener: ``url`` is the SMU's VISA resource name, bare or after ``visa:``."""
    if not isinstance(config, InstrumentBoardConfig):
        raise ConfigError(
            f"a VISA resource ({url}) opens an instrument board and needs an InstrumentBoardConfig "
            "(at least matrix_resource)"
        )
    try:
        manager = pyvisa.ResourceManager(config.visa_library)
    except (OSError, ValueError, pyvisa.Error) as error:
        raise BoardError(f"cannot load the VISA library {config.visa_library!r}: {error}") from None
    smu = open_smu(manager, url.removeprefix("visa:"), config.limits, config.timeout_ms)
    try:
        matrix = SwitchMatrix(open_resource(manager, config.matrix_resource, config.timeout_ms), config.rows,
                              config.cols, config.limits)
    except BaseException:
        smu.close()
        raise
    return InstrumentBoard(InstrumentTile(smu, matrix, config), url)

