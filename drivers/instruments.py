"""Lab instruments over VISA: source-measure units and a switch matrix.

In PyMeasure's spirit an instrument is separate from how it is reached: each driver takes an
open pyvisa resource (TCPIP, GPIB, USB, serial, or pyvisa-sim), checks ``*IDN?`` and refuses an
instrument it does not know. Every voltage, compliance and pulse width is checked against
:class:`SafetyLimits` **before** anything is written, and a refusal names the limit.

Command sets: the Keysight B2900 family (``:SOUR1:...``, ``:MEAS:CURR? (@1)``, pulses by
``:SOUR1:FUNC:SHAP PULS`` and a transient trigger), the Keithley 2450/2460/2461 family
(``:SOUR:VOLT:ILIM``, pulses by ``:SOUR:PULS:TR:VOLT``, as in the 2461 reference manual) and
the Keysight E5250A switch matrix (``:ROUT:CLOS (@card input output)``). Checked here against
simulators only; confirm each on the bench before trusting it with a wafer.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import pyvisa
from pydantic import Field

from cim_hil.config import Strict
from cim_hil.errors import BoardError, UnsafeValueError


class SafetyLimits(Strict):
    """What the devices under test survive; nothing outside this range is ever sent."""

    max_voltage_v: float = Field(2.0, gt=0.0, description="largest |voltage|, DC or pulse")
    max_compliance_a: float = Field(1e-3, gt=0.0, description="largest current compliance")
    min_pulse_width_s: float = Field(50e-6, gt=0.0, description="shortest pulse the SMU can shape")
    max_pulse_width_s: float = Field(10e-3, gt=0.0, description="longest pulse the devices take")
    max_pulses_per_command: int = Field(1000, ge=1)


@dataclass(frozen=True)
class Identity:
    maker: str
    model: str
    serial: str
    firmware: str

    @classmethod
    def parse(cls, answer: str) -> "Identity":
        parts = [part.strip() for part in answer.split(",")] + [""] * 4
        return cls(*parts[:4])


def number(value: float) -> str:
    """SCPI's NR3 form, the same for every command and simulator: 1.000000E-01."""
    return f"{value:.6E}"


class Instrument:
    """One VISA instrument; subclasses list the models they speak to in ``MODELS`` (regexes)."""

    KIND = "instrument"
    MODELS: tuple[str, ...] = ()

    def __init__(self, resource: pyvisa.resources.MessageBasedResource, limits: SafetyLimits | None = None,
                 identity: Identity | None = None) -> None:
        self.resource = resource
        self.name = resource.resource_name
        # One operation (its set-up, the command, "*OPC?" or the reading) at a time: a thread
        # never sees another's answer, and a caller may hold it across instruments.
        self.lock = threading.RLock()
        self.limits = limits or SafetyLimits()
        self.identity = identity or identify(resource)
        if not any(re.fullmatch(pattern, self.identity.model) for pattern in self.MODELS):
            raise BoardError(
                f"{self.name} is a {self.identity.maker} {self.identity.model}, not a {self.KIND} this driver "
                f"speaks to (models {', '.join(self.MODELS)})"
            )

    def write(self, command: str) -> None:
        with self.lock:
            try:
                self.resource.write(command)
            except (pyvisa.Error, OSError) as error:
                raise BoardError(f"instrument {self.name} did not take {command!r}: {error}") from None

    def query(self, command: str) -> str:
        with self.lock:
            try:
                return self.resource.query(command).strip()
            except (pyvisa.Error, OSError) as error:
                raise BoardError(f"instrument {self.name} did not answer {command!r}: {error}") from None

    def close(self) -> None:
        with self.lock:
            try:
                self.resource.close()
            except (pyvisa.Error, OSError):
                pass  # already gone; closing is all we wanted


class SourceMeasureUnit(Instrument):
    """DC current reads at a voltage with compliance, and trains of voltage pulses.

    The source sits at 0 V except while measuring or pulsing, so a switch matrix in front of
    it never switches live.
    """

    KIND = "source-measure unit"

    def __init__(self, resource, limits: SafetyLimits | None = None, identity: Identity | None = None) -> None:
        super().__init__(resource, limits, identity)
        self._mode: tuple | None = None  # what the instrument is set up for now, to skip repeats

    # ---- safety -------------------------------------------------------------------------------
    def _check_voltage(self, volts: float, what: str) -> None:
        if not abs(volts) <= self.limits.max_voltage_v:
            raise UnsafeValueError(
                f"{what} {volts} V exceeds the safety limit max_voltage_v = {self.limits.max_voltage_v} V; "
                f"nothing was sent to {self.name}"
            )

    def _check_compliance(self, amps: float) -> None:
        if not 0 < amps <= self.limits.max_compliance_a:
            raise UnsafeValueError(
                f"current compliance {amps} A is outside (0, max_compliance_a = {self.limits.max_compliance_a} A]; "
                f"nothing was sent to {self.name}"
            )

    def _check_pulse(self, width_s: float, count: int) -> None:
        low, high = self.limits.min_pulse_width_s, self.limits.max_pulse_width_s
        if not low <= width_s <= high:
            raise UnsafeValueError(
                f"pulse width {width_s} s is outside [min_pulse_width_s = {low} s, max_pulse_width_s = {high} s]; "
                f"nothing was sent to {self.name}"
            )
        if not 1 <= count <= self.limits.max_pulses_per_command:
            raise UnsafeValueError(
                f"{count} pulses is outside [1, max_pulses_per_command = {self.limits.max_pulses_per_command}]; "
                f"nothing was sent to {self.name}"
            )

    # ---- operations ---------------------------------------------------------------------------
    def measure_current(self, volts: float, compliance_a: float) -> float:
        """The current (A) at ``volts``, limited to ``compliance_a``."""
        self._check_voltage(volts, "read voltage")
        self._check_compliance(compliance_a)
        with self.lock:
            self._enter(("dc", compliance_a), self._dc_setup(compliance_a))
            self.write(self._set_level(volts))
            try:
                return float(self.query(self._measure()))
            except ValueError as error:
                raise BoardError(f"instrument {self.name} sent a current that is not a number: {error}") from None
            finally:
                self.write(self._set_level(0.0))

    def pulse(self, amplitude_v: float, width_s: float, count: int, compliance_a: float) -> None:
        """``count`` pulses of ``amplitude_v`` for ``width_s`` each, from and back to 0 V."""
        self._check_voltage(amplitude_v, "pulse amplitude")
        self._check_pulse(width_s, count)
        self._check_compliance(compliance_a)
        with self.lock:
            self._enter(("pulse", width_s, compliance_a), self._pulse_setup(width_s, compliance_a))
            for command in self._fire(amplitude_v, width_s, count):
                self.write(command)
            self.query("*OPC?")  # wait until the train is out

    def _enter(self, mode: tuple, commands: list[str]) -> None:
        if self._mode != mode:
            self._mode = None  # unknown until every command went out
            for command in commands:
                self.write(command)
            self._mode = mode

    def close(self) -> None:
        with self.lock:
            if self._mode is not None:
                try:
                    self.write(self._output_off())
                except BoardError:
                    pass  # the instrument is gone; nothing more to switch off
            super().close()

    # ---- one family's command set -------------------------------------------------------------
    def _dc_setup(self, compliance_a: float) -> list[str]:
        raise NotImplementedError

    def _pulse_setup(self, width_s: float, compliance_a: float) -> list[str]:
        raise NotImplementedError

    def _set_level(self, volts: float) -> str:
        raise NotImplementedError

    def _measure(self) -> str:
        raise NotImplementedError

    def _fire(self, amplitude_v: float, width_s: float, count: int) -> list[str]:
        raise NotImplementedError

    def _output_off(self) -> str:
        raise NotImplementedError


class KeysightB2900(SourceMeasureUnit):
    MODELS = (r"B29\d\d[AB]?",)

    def _dc_setup(self, compliance_a):
        return [":SOUR1:FUNC:MODE VOLT", ":SOUR1:FUNC:SHAP DC", self._set_level(0.0),
                f":SENS1:CURR:PROT {number(compliance_a)}", ":OUTP1 ON"]

    def _pulse_setup(self, width_s, compliance_a):
        return [":SOUR1:FUNC:MODE VOLT", ":SOUR1:FUNC:SHAP PULS", self._set_level(0.0),
                f":SOUR1:PULS:WIDT {number(width_s)}", f":SENS1:CURR:PROT {number(compliance_a)}", ":OUTP1 ON"]

    def _set_level(self, volts):
        return f":SOUR1:VOLT {number(volts)}"

    def _measure(self):
        return ":MEAS:CURR? (@1)"

    def _fire(self, amplitude_v, width_s, count):
        return [f":SOUR1:VOLT:TRIG {number(amplitude_v)}", f":TRIG1:TRAN:COUN {count}", ":INIT (@1)"]

    def _output_off(self):
        return ":OUTP1 OFF"


class Keithley2400Graphical(SourceMeasureUnit):
    """The touchscreen 24xx SourceMeters (2450, 2460, 2461) in their SCPI command set."""

    MODELS = (r"(MODEL )?24(50|60|61)",)

    def _dc_setup(self, compliance_a):
        return [":SOUR:FUNC VOLT", self._set_level(0.0), f":SOUR:VOLT:ILIM {number(compliance_a)}", ':SENS:FUNC "CURR"',
                ":OUTP ON"]

    def _pulse_setup(self, width_s, compliance_a):
        return [":SOUR:FUNC VOLT", self._set_level(0.0), f":SOUR:VOLT:ILIM {number(compliance_a)}", ":OUTP ON"]

    def _set_level(self, volts):
        return f":SOUR:VOLT {number(volts)}"

    def _measure(self):
        return ":MEAS:CURR?"

    def _fire(self, amplitude_v, width_s, count):
        return [f":SOUR:PULS:TR:VOLT {number(0.0)}, {number(amplitude_v)}, {number(width_s)}, {count}, OFF", ":INIT"]

    def _output_off(self):
        return ":OUTP OFF"


SMU_DRIVERS: tuple[type[SourceMeasureUnit], ...] = (KeysightB2900, Keithley2400Graphical)


class SwitchMatrix(Instrument):
    """Keysight E5250A: connects the SMU's force line (input 1) to a crossbar row and its low
    line (input 2) to a column. Row r is output pin r + 1, column c is output pin rows + c + 1."""

    KIND = "switch matrix"
    MODELS = (r"E5250A?",)
    CARD = 1
    OUTPUTS_PER_CARD = 48

    def __init__(self, resource, rows: int, cols: int, limits: SafetyLimits | None = None) -> None:
        if rows + cols > self.OUTPUTS_PER_CARD:
            raise UnsafeValueError(f"{rows} rows + {cols} columns exceed the card's {self.OUTPUTS_PER_CARD} outputs")
        super().__init__(resource, limits)
        self.rows, self.cols = rows, cols
        self.connected: tuple[int, int] | None = None
        self.write(":ROUT:OPEN:CARD ALL")

    def connect(self, row: int, col: int) -> None:
        """Route the SMU to device (row, col) only; a no-op when it is already routed there."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise UnsafeValueError(f"device ({row}, {col}) is outside the {self.rows}x{self.cols} array")
        with self.lock:
            if self.connected == (row, col):
                return
            self.connected = None
            self.write(":ROUT:OPEN:CARD ALL")
            self.write(f":ROUT:CLOS (@{self.CARD}01{row + 1:02d},{self.CARD}02{self.rows + col + 1:02d})")
            self.query("*OPC?")  # the relays have settled before the SMU drives the device
            self.connected = (row, col)

    def close(self) -> None:
        try:
            self.write(":ROUT:OPEN:CARD ALL")
        except BoardError:
            pass
        super().close()


def identify(resource) -> Identity:
    """Set the message terminations (SOCKET resources have none by default) and ask *IDN?."""
    resource.read_termination = resource.write_termination = "\n"
    try:
        return Identity.parse(resource.query("*IDN?"))
    except (pyvisa.Error, OSError) as error:
        raise BoardError(f"instrument {resource.resource_name} did not answer '*IDN?': {error}") from None


def open_smu(manager: pyvisa.ResourceManager, resource_name: str, limits: SafetyLimits, timeout_ms: int) -> SourceMeasureUnit:
    """Open ``resource_name`` and pick the SMU driver its ``*IDN?`` names."""
    resource = open_resource(manager, resource_name, timeout_ms)
    identity = identify(resource)
    for driver in SMU_DRIVERS:
        if any(re.fullmatch(pattern, identity.model) for pattern in driver.MODELS):
            return driver(resource, limits, identity)
    resource.close()
    known = ", ".join(pattern for driver in SMU_DRIVERS for pattern in driver.MODELS)
    raise BoardError(
        f"{resource_name} is a {identity.maker} {identity.model}, not a source-measure unit cim-hil knows ({known})"
    )


def open_resource(manager: pyvisa.ResourceManager, resource_name: str, timeout_ms: int):
    try:
        resource = manager.open_resource(resource_name)
    except (pyvisa.Error, OSError, ValueError) as error:
        raise BoardError(f"cannot open VISA resource {resource_name}: {error}") from None
    resource.timeout = timeout_ms
    return resource
