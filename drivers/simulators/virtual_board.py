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
from cim_hil.errors import BoardError, ConfigError
from drivers.link import BITS_PER_BYTE
from drivers.simulators.faults import FaultPlan, LineFaults
from drivers.simulators.firmware import BoardFirmware
from firmware_protocol.framing import VERSION, FrameDecoder

POLL_S = 0.02  # how often the serving loop looks at its stop flag


class _PtyLine:
    """A pseudo-terminal pair: the host opens ``path`` (the slave end) like any serial port.

    The master end does not block: a host that stops reading (or died with its answers unread)
    has them dropped after ``SEND_TIMEOUT_S`` instead of stalling the board.
    """

    SEND_TIMEOUT_S = 2.0

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line editing: a clean 8-bit line
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)  # the slave stays open here, so a host may come and go

    def wait_readable(self, timeout: float) -> bool:
        return bool(select.select([self.master], [], [], timeout)[0])

    def read(self) -> bytes:
        try:
            return os.read(self.master, 65536)
        except BlockingIOError:
            return b""
        except OSError as error:
            if error.errno == errno.EIO:
                return b""  # no host on the line right now
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not select.select([], [self.master], [], self.SEND_TIMEOUT_S)[1]:
                return  # nobody reads the line: the host retries, or has gone
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                continue

    def close(self) -> None:
        if self.master is not None:  # once only: a closed fd number may already belong to someone else
            os.close(self.master)
            os.close(self.slave)
            self.master = self.slave = None


class _TcpLine:
    """A listening socket on loopback that serves one host at a time (``socket://`` in pyserial).

    Any host may die at any moment (RST, killed mid-reply, never reading): its errors end its
    session, never the server. A host that connects while another is served gets ERROR BUSY to
    each request until it leaves (at most ``MAX_WAITING`` of them, each for ``WAITING_S``); the
    next host starts a fresh session through ``on_host``, so nothing of the last one is answered.
    """

    MAX_WAITING = 16
    WAITING_S = 5.0
    SEND_TIMEOUT_S = 2.0  # a host that stops reading for this long has left

    def __init__(self, port: int, on_host, busy_answer) -> None:
        if not 0 <= port <= 0xFFFF:
            raise ConfigError(f"TCP port {port} is outside 0..65535")
        try:
            self.listener = socket.create_server(("127.0.0.1", port))
        except OSError as error:
            raise BoardError(f"cannot listen on 127.0.0.1:{port}: {error.strerror or error}") from None
        self.listener.setblocking(False)
        self.path = f"socket://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connection: socket.socket | None = None
        self._waiting: dict[socket.socket, tuple[FrameDecoder, float]] = {}
        self._on_host, self._busy_answer = on_host, busy_answer

    def wait_readable(self, timeout: float) -> bool:
        watched = [self.listener, *self._waiting, *([self.connection] if self.connection else [])]
        readable = select.select(watched, [], [], timeout)[0]
        now = time.monotonic()
        for sock in readable:
            if sock is self.listener:
                self._accept(now)
            elif sock in self._waiting:
                if self._served_host_gone():  # it left a moment before this one came: serve this one
                    del self._waiting[sock]
                    self._begin_session(sock)
                    return True
                self._answer_waiting(sock)
        for sock, (_, deadline) in list(self._waiting.items()):
            if now > deadline:
                self._drop_waiting(sock)
        return self.connection is not None and self.connection in readable

    def _served_host_gone(self) -> bool:
        """Whether the host being served has closed or reset (a peek, nothing consumed)."""
        if self.connection is None:
            return True
        self.connection.setblocking(False)  # a socket with a timeout would wait for data first
        try:
            gone = self.connection.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        self.connection.settimeout(self.SEND_TIMEOUT_S)
        if gone:
            self._end_session()
        return gone

    def _begin_session(self, sock: socket.socket) -> None:
        sock.settimeout(self.SEND_TIMEOUT_S)
        self.connection = sock
        self._on_host()

    def _accept(self, now: float) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # the host reset before we took it
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return  # out of descriptors: it stays in the backlog until some close
            raise
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # reset between accept and here
            sock.close()
            return
        if self._served_host_gone():
            self._begin_session(sock)
        elif len(self._waiting) < self.MAX_WAITING:
            sock.setblocking(False)
            self._waiting[sock] = (FrameDecoder(), now + self.WAITING_S)
        else:
            sock.close()  # too many waiting already: closed at once

    def _answer_waiting(self, sock: socket.socket) -> None:
        decoder, _ = self._waiting[sock]
        try:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("closed")
            for frame in decoder.feed(data):
                if (answer := self._busy_answer(frame)) is not None:
                    sock.send(answer)  # small; a host that cannot take it is dropped below
        except OSError:  # reset, closed, or not reading: it is gone
            self._drop_waiting(sock)

    def _drop_waiting(self, sock: socket.socket) -> None:
        del self._waiting[sock]
        sock.close()

    def read(self) -> bytes:
        try:
            data = self.connection.recv(65536)
        except OSError:  # reset by the host, or it vanished
            data = b""
        if not data:  # the host closed its end; wait for the next one
            self._end_session()
        return data

    def write(self, data: bytes) -> None:
        if self.connection is None:
            return  # the host left while its answers were being made
        try:
            self.connection.sendall(data)
        except OSError:  # broken pipe, reset, or a host that stopped reading
            self._end_session()

    def _end_session(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def close(self) -> None:
        for sock in (self.connection, self.listener, *self._waiting):
            if sock is not None:
                sock.close()  # idempotent for sockets
        self._waiting.clear()


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
    (a background thread) or ``serve_forever()``; ``stop()`` ends it. ``windows=False`` serves
    firmware from before protocol v3's windows (SPEC.md §8.5): hosts then send padding."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        pace_baudrate: int | None = None,
        faults: FaultPlan | None = None,
        protocol_version: int = VERSION,
        windows: bool = True,
    ) -> None:
        self.config = config or EmulatorConfig()
        self.firmware = BoardFirmware(lambda: build_emulator(self.config, "virtual-board"), protocol_version, windows)
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
        self._line = _TcpLine(port, self.firmware.new_session, self.firmware.busy_answer)
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
