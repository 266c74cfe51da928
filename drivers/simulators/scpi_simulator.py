"""Loopback SCPI instruments backed by the emulator's device physics, on real TCP sockets.

A Keysight B2900-style SMU and an E5250A-style switch matrix listen on 127.0.0.1; pyvisa
reaches them with the pyvisa-py backend as ``TCPIP0::127.0.0.1::<port>::SOCKET``. Behind them
sits one :class:`SimulatedCrossbar` of emulator devices: a DC read returns V x G (with read
noise, limited by the compliance) of the device the matrix routes to; a pulse train above the
switching threshold moves that device by the soft-bounds model, one pulse at a time. So
calibration runs end to end through VISA against devices whose true parameters are known.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable

import torch

from cim_hil.config import EmulatorConfig
from cim_hil.emulator.board import tile_generator
from cim_hil.emulator.devices import DeviceArray

NUMBER = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"


class SimulatedCrossbar:
    """The devices a probe station touches, one routed device at a time."""

    def __init__(self, config: EmulatorConfig, switching_threshold_v: float = 0.8) -> None:
        rows, cols = config.soc.rows, config.soc.cols
        self.devices = DeviceArray(config.device, rows, cols, tile_generator(config.seed, 0, torch.device("cpu")))
        self.read_noise_us = config.device.read_noise_levels * config.device.level_spacing_us
        self.threshold_v = switching_threshold_v
        self.routed: tuple[int, int] | None = None
        self.pulses_applied = 0

    def current_a(self, volts: float) -> float:
        if self.routed is None:
            return 0.0  # open circuit
        conductance_us = float(self.devices.read(self.read_noise_us)[self.routed])
        return volts * conductance_us * 1e-6

    def pulse(self, volts: float, count: int) -> None:
        if self.routed is None or abs(volts) < self.threshold_v:
            return  # nothing routed, or below the switching threshold: no change
        counts = torch.zeros(self.devices.shape, dtype=torch.int64)
        counts[self.routed] = count if volts > 0 else -count
        self.devices.pulse(counts)
        self.pulses_applied += count


class ScpiServer:
    """One instrument on a loopback socket: newline-terminated commands in, answers out.

    ``received`` logs every command line (what went over the wire); ``mute`` makes it stop
    answering, as a hung instrument would.
    """

    def __init__(self, handle: Callable[[str], str | None]) -> None:
        self.handle = handle
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resource_name = f"TCPIP0::127.0.0.1::{self.port}::SOCKET"
        self.received: list[str] = []
        self.mute = False
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"scpi-{self.port}")
        self._stopping = False
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # listener closed
            with connection:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._converse(connection)

    def _converse(self, connection: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            # Acknowledge at once: a host that writes twice in a row (Nagle) would otherwise wait
            # for the delayed ACK, 40 ms per command. Linux re-arms delayed ACKs after each recv.
            if hasattr(socket, "TCP_QUICKACK"):
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                command = line.decode("ascii", "replace").strip()
                if not command:
                    continue
                self.received.append(command)
                answer = self.handle(command)
                if answer is not None and not self.mute:
                    connection.sendall(answer.encode("ascii") + b"\n")

    def close(self) -> None:
        self._stopping = True
        self.listener.close()


class SimulatedSmu:
    """The Keysight B2900 command subset the driver uses, with an error queue for the rest."""

    def __init__(self, crossbar: SimulatedCrossbar, idn: str = "Keysight Technologies,B2902A,SIM00001,1.0") -> None:
        self.crossbar, self.idn = crossbar, idn
        self.errors: list[str] = []
        self.reset()
        self.commands: list[tuple[re.Pattern, Callable]] = [
            (re.compile(r"\*IDN\?"), lambda: self.idn),
            (re.compile(r"\*OPC\?"), lambda: "1"),
            (re.compile(r"\*RST"), self.reset),
            (re.compile(r":SYST:ERR\?"), lambda: self.errors.pop(0) if self.errors else '+0,"No error"'),
            (re.compile(r":SOUR1:FUNC:MODE VOLT"), lambda: None),
            (re.compile(r":SOUR1:FUNC:SHAP (DC|PULS)"), lambda shape: self.state.update(shape=shape)),
            (re.compile(rf":SOUR1:VOLT {NUMBER}"), lambda v: self.state.update(level=float(v))),
            (re.compile(rf":SOUR1:VOLT:TRIG {NUMBER}"), lambda v: self.state.update(trigger=float(v))),
            (re.compile(rf":SOUR1:PULS:WIDT {NUMBER}"), lambda v: self.state.update(width=float(v))),
            (re.compile(rf":SENS1:CURR:PROT {NUMBER}"), lambda v: self.state.update(compliance=float(v))),
            (re.compile(r":OUTP1 (ON|OFF)"), lambda on: self.state.update(output=on == "ON")),
            (re.compile(r":TRIG1:TRAN:COUN (\d+)"), lambda n: self.state.update(count=int(n))),
            (re.compile(r":INIT \(@1\)"), self._fire),
            (re.compile(r":MEAS:CURR\? \(@1\)"), self._measure),
        ]
        self.server = ScpiServer(self.handle)

    def reset(self) -> None:
        self.state = dict(shape="DC", level=0.0, trigger=0.0, width=1e-3, compliance=1e-4, output=False, count=1)

    def handle(self, command: str) -> str | None:
        for pattern, action in self.commands:
            match = pattern.fullmatch(command)
            if match:
                return action(*match.groups())
        self.errors.append(f'-113,"Undefined header; {command}"')
        return None

    def _measure(self) -> str:
        state = self.state
        if not state["output"] or state["shape"] != "DC":
            return number_text(0.0)
        current = self.crossbar.current_a(state["level"])
        return number_text(max(-state["compliance"], min(state["compliance"], current)))

    def _fire(self) -> None:
        if self.state["output"] and self.state["shape"] == "PULS":
            self.crossbar.pulse(self.state["trigger"], self.state["count"])


class SimulatedMatrix:
    """The Keysight E5250A routing subset: input 1 (SMU force) to a row, input 2 to a column."""

    def __init__(self, crossbar: SimulatedCrossbar, idn: str = "Keysight Technologies,E5250A,SIM00002,1.0") -> None:
        self.crossbar, self.idn = crossbar, idn
        self.closed: set[tuple[int, int]] = set()
        self.server = ScpiServer(self.handle)

    def handle(self, command: str) -> str | None:
        if command == "*IDN?":
            return self.idn
        if command == "*OPC?":
            return "1"  # relays settled: routing is done when this answer leaves
        if command == ":ROUT:OPEN:CARD ALL":
            self.closed.clear()
        elif match := re.fullmatch(r":ROUT:CLOS \(@([\d,]+)\)", command):
            for channel in match.group(1).split(","):
                self.closed.add((int(channel[1:3]), int(channel[3:5])))
        self._route()
        return None

    def _route(self) -> None:
        rows, cols = self.crossbar.devices.shape
        row = [pin - 1 for inp, pin in self.closed if inp == 1 and 1 <= pin <= rows]
        col = [pin - rows - 1 for inp, pin in self.closed if inp == 2 and rows < pin <= rows + cols]
        self.crossbar.routed = (row[0], col[0]) if len(row) == 1 and len(col) == 1 else None


def number_text(value: float) -> str:
    return f"{value:+.6E}"


class SimulatedProbeStation:
    """An SMU and a switch matrix on one simulated crossbar; close() stops both."""

    def __init__(self, config: EmulatorConfig, switching_threshold_v: float = 0.8) -> None:
        self.crossbar = SimulatedCrossbar(config, switching_threshold_v)
        self.smu = SimulatedSmu(self.crossbar)
        self.matrix = SimulatedMatrix(self.crossbar)

    def close(self) -> None:
        self.smu.server.close()
        self.matrix.server.close()

    def __enter__(self) -> "SimulatedProbeStation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
