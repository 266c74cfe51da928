"""A virtual board: the emulator behind the firmware protocol, on a real pseudo-terminal or a
real loopback TCP socket, so the serial driver (and CI) exercise the whole path without a chip.

Optional pacing makes the line behave like a UART at a given baud rate (10 bits per byte, both
directions), so link-bound figures are honest; optional faults damage the line on purpose.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
import tty

from cim_hil.config import EmulatorConfig
from cim_hil.emulator.board import build_emulator
from drivers.simulators.faults import FaultPlan, LineFaults
from drivers.simulators.firmware import BoardFirmware
from drivers.link import BITS_PER_BYTE
from firmware_protocol.framing import VERSION

POLL_S = 0.02  # how often the serving loop looks at its stop flag


class _PtyLine:
    """A pseudo-terminal pair: the host opens ``path`` (the slave end) like any serial port."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing: a clean 8-bit line
        self.path = os.ttyname(self.slave)  # the slave stays open here, so a host may come and go

    def wait_readable(self, timeout: float) -> bool:
        return bool(select.select([self.master], [], [], timeout)[0])

    def read(self) -> bytes:
        try:
            return os.read(self.master, 65536)
        except OSError as error:
            if error.errno == errno.EIO:
                return b""  # no host on the line right now
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def close(self) -> None:
        if self.master is not None:  # once only: a closed fd number may already belong to someone else
            os.close(self.master)
            os.close(self.slave)
            self.master = self.slave = None


class _TcpLine:
    """A listening socket on loopback; one host connection at a time (``socket://`` in pyserial)."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.path = f"socket://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connection: socket.socket | None = None

    def wait_readable(self, timeout: float) -> bool:
        watched = [self.connection or self.listener]
        if not select.select(watched, [], [], timeout)[0]:
            return False
        if self.connection is None:
            self.connection, _ = self.listener.accept()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return False
        return True

    def read(self) -> bytes:
        data = self.connection.recv(65536)
        if not data:  # the host closed its end; wait for the next one
            self.connection.close()
            self.connection = None
        return data

    def write(self, data: bytes) -> None:
        if self.connection is not None:
            self.connection.sendall(data)

    def close(self) -> None:
        for sock in (self.connection, self.listener):
            if sock is not None:
                sock.close()  # idempotent for sockets


class _Pacer:
    """Holds bytes back as long as a UART at ``baudrate`` would take to move them."""

    def __init__(self, baudrate: int) -> None:
        self.byte_s = BITS_PER_BYTE / baudrate
        self._rx_done = self._tx_done = 0.0

    def received(self, count: int) -> None:
        self._rx_done = max(time.perf_counter(), self._rx_done) + count * self.byte_s
        self._sleep_until(self._rx_done)

    def sending(self, count: int) -> None:
        self._tx_done = max(time.perf_counter(), self._tx_done) + count * self.byte_s
        self._sleep_until(self._tx_done)

    @staticmethod
    def _sleep_until(moment: float) -> None:
        if (wait := moment - time.perf_counter()) > 0:
            time.sleep(wait)


class VirtualBoard:
    """Serve an emulated board on one line. ``open_pty()`` or ``open_tcp()``, then ``start()``
    (a background thread) or ``serve_forever()``; ``stop()`` ends it."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        pace_baudrate: int | None = None,
        faults: FaultPlan | None = None,
        protocol_version: int = VERSION,
    ) -> None:
        self.config = config or EmulatorConfig()
        self.firmware = BoardFirmware(lambda: build_emulator(self.config, "virtual-board"), protocol_version)
        self.faults = LineFaults(faults) if faults else None
        self._pace_baudrate = pace_baudrate
        self._line: _PtyLine | _TcpLine | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.answers_sent = 0

    @property
    def url(self) -> str:
        if self._line is None:
            raise RuntimeError("open_pty() or open_tcp() first")
        return self._line.path

    def open_pty(self) -> str:
        """Open a pseudo-terminal; returns the path a host opens as its serial port."""
        self._line = _PtyLine()
        return self.url

    def open_tcp(self, port: int = 0) -> str:
        """Listen on 127.0.0.1 (``port`` 0: any free one); returns the ``socket://`` URL."""
        self._line = _TcpLine(port)
        return self.url

    def start(self) -> "VirtualBoard":
        self._thread = threading.Thread(target=self.serve_forever, name="virtual-board", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        line, pacer = self._line, _Pacer(self._pace_baudrate) if self._pace_baudrate else None
        if line is None:
            raise RuntimeError("open_pty() or open_tcp() first")
        try:
            while not self._stopping.is_set():
                if not line.wait_readable(POLL_S):
                    continue
                data = line.read()
                if not data:
                    time.sleep(POLL_S)  # pty with no host: EIO until one opens it
                    continue
                if pacer:
                    pacer.received(len(data))
                if self.faults:
                    data = self.faults.damage(data)
                for answer in self.firmware.receive(data):
                    self._send(line, pacer, answer)
                    if self._should_hang_up():
                        return
        finally:
            line.close()  # closed by the serving thread only, so no other thread races on the fd

    def _send(self, line, pacer: _Pacer | None, answer: bytes) -> None:
        if self.faults:
            time.sleep(self.faults.stall_s())
            answer = self.faults.damage(answer)
        if pacer:
            pacer.sending(len(answer))
        line.write(answer)
        self.answers_sent += 1

    def _should_hang_up(self) -> bool:
        limit = self.faults.plan.hang_up_after_answers if self.faults else None
        return limit is not None and self.answers_sent >= limit

    def stop(self) -> None:
        """Close the line (within POLL_S), as a pulled cable would, and wait for the thread."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "VirtualBoard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
