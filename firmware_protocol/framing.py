"""Frames on the wire: header + payload + CRC-16, COBS-encoded between 0x00 delimiters.

    offset  size  field
    0       1     version        (3)
    1       1     type
    2       2     sequence number (u16 LE)
    4       1     flags          (bit 0: MORE, another fragment of this message follows)
    5       2     payload length N (u16 LE, at most MAX_PAYLOAD)
    7       N     payload
    7+N     2     CRC-16/CCITT-FALSE over bytes 0 .. 6+N (u16 LE)

Wire form: 0x00, COBS(frame), 0x00. The leading delimiter isolates any line noise that came
before, so a frame after garbage is never lost. See SPEC.md.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cobs import cobs

from firmware_protocol.errors import (
    BadLengthError,
    CrcError,
    FramingError,
    ProtocolError,
    TruncatedFrameError,
    VersionError,
)

VERSION = 3
MAX_PAYLOAD = 1024
HEADER = struct.Struct("<BBHBH")
CRC = struct.Struct("<H")
FLAG_MORE = 0x01
DELIMITER = b"\x00"
MAX_ENCODED = HEADER.size + MAX_PAYLOAD + CRC.size + (HEADER.size + MAX_PAYLOAD + CRC.size) // 254 + 1


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, xorout 0 (check 0x29B1)."""
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int
    payload: bytes = b""
    flags: int = 0
    version: int = VERSION

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of ``frame``, delimiters included."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise BadLengthError(f"payload of {len(frame.payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    if not (0 <= frame.seq <= 0xFFFF and 0 <= frame.type <= 0xFF and 0 <= frame.flags <= 0xFF):
        raise ProtocolError(f"header field out of range in {frame!r}")
    body = HEADER.pack(frame.version, frame.type, frame.seq, frame.flags, len(frame.payload)) + frame.payload
    return DELIMITER + cobs.encode(body + CRC.pack(crc16(body))) + DELIMITER


def decode_frame(encoded: bytes, speaks: int | None = VERSION) -> Frame:
    """One frame from the bytes between two delimiters (without them). ``speaks`` None
    accepts a frame of any version: the header is the same in all of them, and a board must
    see a foreign frame to answer it (SPEC.md §1)."""
    try:
        raw = cobs.decode(encoded)
    except cobs.DecodeError as error:
        raise FramingError(f"COBS decoding failed: {error}") from None
    if len(raw) < HEADER.size + CRC.size:
        raise TruncatedFrameError(f"frame of {len(raw)} bytes is shorter than header + CRC")
    body, (received_crc,) = raw[:-2], CRC.unpack(raw[-2:])
    if crc16(body) != received_crc:
        raise CrcError(f"CRC mismatch: computed {crc16(body):#06x}, received {received_crc:#06x}")
    version, kind, seq, flags, length = HEADER.unpack(body[: HEADER.size])
    payload = body[HEADER.size :]
    if speaks is not None and version != speaks:
        raise VersionError(f"protocol version {version}; this side speaks {speaks}")
    if length > MAX_PAYLOAD:
        raise BadLengthError(f"length field {length} exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    if length != len(payload):
        raise BadLengthError(f"length field says {length} bytes, frame holds {len(payload)}")
    return Frame(kind, seq, bytes(payload), flags, version)


class FrameDecoder:
    """Turns a byte stream cut at arbitrary points into frames.

    ``feed`` returns every frame completed by the new bytes; a chunk between delimiters that is not a valid frame is
    counted in ``rejected`` and its error kept in ``last_error``, and decoding carries on at
    the next delimiter. A chunk longer than any valid frame is dropped as it grows, so garbage
    never makes the buffer unbounded.
    """

    def __init__(self, speaks: int | None = VERSION) -> None:
        self.speaks = speaks  # as decode_frame's: None passes frames of every version
        self._buffer = bytearray()
        self._overflowed = False
        self.rejected = 0
        self.last_error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        frames = []
        for chunk in self._chunks(data):
            if not chunk:
                continue  # back-to-back delimiters
            try:
                frames.append(decode_frame(chunk, self.speaks))
            except ProtocolError as error:
                self.rejected += 1
                self.last_error = error
        return frames

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        """The completed chunks between delimiters; the unfinished tail stays buffered."""
        start = 0
        while True:
            end = data.find(0, start)
            if end < 0:
                self._append(data[start:])
                return
            self._append(data[start:end])
            if self._overflowed:
                self.rejected += 1
                self.last_error = BadLengthError(f"more than {MAX_ENCODED} bytes without a delimiter")
                chunk = b""
            else:
                chunk = bytes(self._buffer)
            self._buffer.clear()
            self._overflowed = False
            yield chunk
            start = end + 1

    def _append(self, data: bytes) -> None:
        if self._overflowed:
            return
        self._buffer += data
        if len(self._buffer) > MAX_ENCODED:
            self._buffer.clear()
            self._overflowed = True
