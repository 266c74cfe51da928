"""The host's side of the firmware protocol: one request in, one reply out, over any pyserial port.

Stop-and-wait as ../firmware_protocol/SPEC.md §2-3 says: a request is cut into fragments, each
waits for its ACK; a long reply is fetched piece by piece with NEXT. A frame that gets no valid
answer in time is re-sent with the **same** sequence number, so the board answers a repeat from
its kept reply instead of running the command twice. Everything that crosses the line is counted
in :class:`LinkStats`, so a user can see when the link, not the array, limits a run. The codec's
``ProtocolError`` (a plain ``ValueError``: the codec knows nothing of cim-hil) becomes a
``BoardError`` naming the port here, where the framework meets the wire.
"""

from __future__ import annotations

import random
import re
import select
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import serial

from cim_hil.config import LinkConfig
from cim_hil.errors import BoardError, UnsafeValueError
from firmware_protocol.errors import ProtocolError
from firmware_protocol.framing import MAX_ENCODED, MAX_PAYLOAD, Frame, FrameDecoder, encode_frame
from firmware_protocol.messages import REGISTRY, Ack, Error, ErrorCode, Message, Next, Reassembler, fragments

BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
NEXT_WINDOW = 8  # pieces of a long reply asked for at once (SPEC.md §8.4)
NEXT_PAYLOAD = 4  # NEXT's u32 piece number


@dataclass
class LinkStats:
    """What crossed the line, host's view. ``seconds`` is wall time spent waiting on requests."""

    requests: int = 0
    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    payload_bytes_out: int = 0
    payload_bytes_in: int = 0
    retries: int = 0
    rejected_frames: int = 0
    stale_frames: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class BoardNotAnswering(BoardError):
    """No valid answer to one frame within the whole retry budget."""


class BoardRefused(BoardError):
    """The board answered ERROR: it refused the request and changed nothing."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _type_name(kind: int) -> str:
    """The SPEC.md name of a message type: ReadMap -> READ_MAP."""
    cls = REGISTRY.get(kind)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper() if cls else f"type {kind:#04x}"


class Link:
    """Requests and replies over an open pyserial port (``serial_for_url`` of a path or URL)."""

    POLL_S = 0.005  # read timeout for ports without a file descriptor to wait on (loop://, rfc2217://)

    def __init__(self, port: serial.SerialBase, name: str, config: LinkConfig) -> None:
        self.port = port
        try:
            self._fd: int | None = port.fileno()
        except (AttributeError, NotImplementedError, OSError, serial.SerialException):
            self._fd = None
        # Set once (pyserial reconfigures the port on every change). With a descriptor we wait in
        # select() and then read all that is there without blocking; pyserial's socket handler
        # reports at most 1 byte in_waiting, so reading "in_waiting" bytes would go byte by byte.
        port.timeout = 0 if self._fd is not None else self.POLL_S
        self.name = name
        self.config = config
        self.max_payload = MAX_PAYLOAD
        self.stats = LinkStats()
        self._decoder = FrameDecoder()
        self._inbox: deque[Frame] = deque()  # decoded frames not yet looked at
        self.window = NEXT_WINDOW
        # A fresh start keeps a restarted host from colliding with the seq the board last saw.
        self._seq = random.randrange(1, 0x10000)
        # One request (every fragment, retry and NEXT of it) owns the line until its reply is
        # whole: threads sharing a board take turns by request, never by frame.
        self._lock = threading.RLock()

    # ---- requests ---------------------------------------------------------------------------
    def request(self, message: Message, expect: type[Message], reply_size: int | None = None) -> Message:
        """Send ``message``, return the board's reply of type ``expect``; ERROR replies raise
        :class:`BoardRefused` (or UnsafeValueError for OUT_OF_RANGE). Thread-safe: one
        request at a time holds the line. ``reply_size``, the reply's payload bytes where the
        caller can tell (at least), keeps the host from asking for pieces past the reply's end."""
        with self._lock:
            started = time.perf_counter()
            self.stats.requests += 1
            try:
                try:
                    frames = fragments(message, self._take_seq(), self.max_payload)
                except ProtocolError as error:
                    raise BoardError(
                        f"{_type_name(message.TYPE)} cannot be sent to the board on {self.name}: {error}"
                    ) from None
                self._seq = (self._seq + len(frames) - 1) & 0xFFFF
                for frame in frames[:-1]:
                    answer = self._exchange(frame)
                    if answer.type != Ack.TYPE:
                        self._raise_error(answer, frame)
                reply = self._collect(self._exchange(frames[-1]), reply_size)
            finally:
                self.stats.seconds += time.perf_counter() - started
        if isinstance(reply, Error):
            self._raise_refusal(reply)
        if not isinstance(reply, expect):
            raise BoardError(
                f"board on {self.name} answered {_type_name(message.TYPE)} with {_type_name(reply.TYPE)}, "
                f"expected {_type_name(expect.TYPE)}"
            )
        return reply

    def resynchronise(self) -> None:
        """Flush any partial chunk at the board and anything stale on our side (SPEC.md §3)."""
        with self._lock:
            self._io(lambda: (self.port.write(b"\x00\x00"), self.port.flush(), self.port.reset_input_buffer()))
            self._decoder = FrameDecoder()
            self._inbox.clear()

    def close(self) -> None:
        with self._lock:
            try:
                self.port.close()
            except (serial.SerialException, OSError):
                pass  # the port is gone already; closing it is all we wanted

    # ---- one frame, its answer, and the pieces of a long reply ------------------------------
    def _take_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def _collect(self, first: Frame, reply_size: int | None = None) -> Message:
        """The whole reply that starts with ``first``: further pieces are asked for by number
        with NEXT, up to ``window`` at once (SPEC.md §8.4), so the line does not wait a round
        trip per piece. A lost answer is asked for again with the same seq; asking twice for
        one piece is harmless. Past the pieces ``reply_size`` promises, one is asked at a time."""
        promised = -(-reply_size // MAX_PAYLOAD) if reply_size else None
        pieces, end, beyond = {0: first}, None if first.more else 0, None  # end: the last piece's number
        flight: dict[int, list] = {}  # seq -> [piece, wire, deadline, tries]
        wanted = 1
        while end is None or len(pieces) <= end:
            limit = end + 1 if end is not None else beyond
            while len(flight) < self.window and (limit is None or wanted < limit) and (
                    promised is None or wanted < promised or not flight):
                seq = self._take_seq()
                flight[seq] = [wanted, encode_frame(Frame(Next.TYPE, seq, Next(wanted).encode())), 0.0, 0]
                self._send(flight[seq])
                wanted += 1
            if not flight:
                raise BoardError(f"board on {self.name} ended a reply without its last piece")
            frame = self._await(flight, Next.TYPE, min(entry[2] for entry in flight.values()))
            if frame is None:
                for entry in flight.values():
                    if entry[2] <= time.monotonic():
                        self._resend(entry)
                continue
            piece = flight.pop(frame.seq)[0]
            if frame.type == Error.TYPE:
                error = self._decode(frame)
                if error.code != ErrorCode.NO_PENDING_REPLY:
                    self._raise_refusal(error)
                beyond = piece if beyond is None else min(beyond, piece)  # asked past the end
                continue
            pieces[piece] = frame
            if not frame.more:
                end = piece
                flight = {seq: entry for seq, entry in flight.items() if entry[0] < piece}
        reassembler = Reassembler()
        for index in range(end + 1):
            message = self._decode(pieces[index], reassembler)
        return message

    def _decode(self, frame: Frame, reassembler: Reassembler | None = None) -> Message | None:
        try:
            return (reassembler or Reassembler()).add(frame)
        except ProtocolError as error:
            raise BoardError(f"board on {self.name} sent a malformed {_type_name(frame.type)}: {error}") from None

    def _send(self, entry: list) -> None:
        """Write an in-flight NEXT ([piece, wire, deadline, tries]) and start its timeout."""
        wire = entry[1]
        self._write(wire, NEXT_PAYLOAD)
        entry[2] = time.monotonic() + self._timeout(len(wire), self.window)
        entry[3] += 1

    def _write(self, wire: bytes, payload_bytes: int) -> None:
        """Put one encoded frame on the line, and count it."""
        self._io(lambda: self.port.write(wire))
        self.stats.frames_out += 1
        self.stats.bytes_out += len(wire)
        self.stats.payload_bytes_out += payload_bytes

    def _resend(self, entry: list) -> None:
        if entry[3] > self.config.retries:
            self.resynchronise()
            raise BoardNotAnswering(
                f"board on {self.name} did not answer NEXT ({self.config.retries + 1} tries); check the cable, "
                f"the port and the baud rate ({self.config.baudrate})"
            )
        self.stats.retries += 1
        self._send(entry)

    def _timeout(self, wire_bytes: int, answers: int = 1) -> float:
        """How long to wait for an answer: the response timeout plus the line time of the frame
        and of ``answers`` longest answers (with NEXTs in flight, those queued ahead of it)."""
        line_s = (wire_bytes + answers * MAX_ENCODED) * BITS_PER_BYTE / self.config.baudrate
        return self.config.response_timeout_s + line_s

    def _exchange(self, frame: Frame) -> Frame:
        """Send ``frame`` until a valid answer with its seq arrives; re-sends keep the seq."""
        wire = encode_frame(frame)
        timeout = self._timeout(len(wire))
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.stats.retries += 1
            self._write(wire, len(frame.payload))
            answer = self._await({frame.seq}, frame.type, time.monotonic() + timeout)
            if answer is not None:
                return answer
        self.resynchronise()
        raise BoardNotAnswering(
            f"board on {self.name} did not answer {_type_name(frame.type)} "
            f"({self.config.retries + 1} tries, {timeout:.3g} s each); check the cable, the port "
            f"and the baud rate ({self.config.baudrate})"
        )

    def _await(self, seqs, sent_type: int, deadline: float) -> Frame | None:
        """The first valid answer to one of the frames sent with ``seqs``, or None at the
        deadline (or on the board's BAD_CRC, which is a timeout). Frames that arrive together
        wait in the inbox for the next call."""
        while True:
            while self._inbox:
                frame = self._inbox.popleft()
                self.stats.frames_in += 1
                if frame.type == sent_type and frame.seq in seqs and not frame.type & 0x80:
                    raise BoardError(
                        f"the link on {self.name} echoes what it is sent (loop:// or a loopback plug?); "
                        "no board is answering"
                    )
                if frame.type == Error.TYPE and frame.payload[:1] == bytes([ErrorCode.BAD_CRC]):
                    return None  # never an answer, whatever its seq (SPEC.md §3): re-send now
                if frame.seq not in seqs or not frame.type & 0x80:
                    self.stats.stale_frames += 1
                    continue
                self.stats.payload_bytes_in += len(frame.payload)
                return frame
            if time.monotonic() >= deadline:
                return None
            data = self._io(lambda: self._read_some(deadline))
            self.stats.bytes_in += len(data)
            rejected_before = self._decoder.rejected
            self._inbox.extend(self._decoder.feed(data))
            self.stats.rejected_frames += self._decoder.rejected - rejected_before

    def _read_some(self, deadline: float) -> bytes:
        if self._fd is None:
            return self.port.read(max(1, self.port.in_waiting))
        if not select.select([self._fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return b""
        return self.port.read(65536)

    def _io(self, operation):
        """Run a port operation; a vanished port becomes a BoardError naming it."""
        try:
            return operation()
        except (serial.SerialException, OSError) as error:
            raise BoardError(
                f"lost the link to the board on {self.name}: {error}; the command in flight may or may not "
                "have run on the board"
            ) from None

    # ---- refusals -----------------------------------------------------------------------------
    def _raise_error(self, frame: Frame, sent: Frame) -> None:
        reply = self._collect(frame)
        if isinstance(reply, Error):
            self._raise_refusal(reply)
        raise BoardError(f"board on {self.name} answered a {_type_name(sent.type)} fragment with {type(reply).__name__}")

    def _raise_refusal(self, error: Error) -> None:
        try:
            code = ErrorCode(error.code).name
        except ValueError:
            code = f"code {error.code}"
        text = f"board on {self.name} refused {_type_name(error.request_type)}: {code}"
        if error.text:
            text += f": {error.text}"
        if error.code == ErrorCode.OUT_OF_RANGE:
            raise UnsafeValueError(text)
        raise BoardRefused(text, error.code)
