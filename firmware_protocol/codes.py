"""How a run of signed converter codes is written in a payload (SPEC.md §8.1).

A layer's inputs and outputs are most of what crosses the line in training, so v3 messages
name one of these formats instead of always spending two bytes where one is enough:

    1  i8: one byte per code
    2  i16: two bytes per code, little-endian
    3  i8 with escapes: a code in -127..127 is one byte; any other code is 0x80, then its i16
    4  i8 with zero runs: a code in -127..127 is one byte; 0x80, then u8 n (1..255), stands
       for n zero codes (inputs after a ReLU, and the background of an image, are mostly 0)

0x80 (-128) is never a code of formats 3 and 4, which is what frees it as the marker. The
count of codes always follows from the message's header, so a reader knows where a run ends.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from firmware_protocol.errors import PayloadError

MARKER = 0x80
LONGEST_RUN = 255
SHORTEST_RUN = 3  # shorter runs of zeros are written as plain 0x00 bytes: canonical, never longer


class CodeFormat(IntEnum):
    I8 = 1
    I16 = 2
    I8_ESCAPED = 3
    I8_ZERO_RUNS = 4


def code_format(value: int, what: str) -> CodeFormat:
    try:
        return CodeFormat(value)
    except ValueError:
        raise PayloadError(f"{what}: code format {value} is none of 1 (i8), 2 (i16), 3 (escaped i8), 4 (i8 with zero runs)") from None


def encode_codes(codes: np.ndarray, form: CodeFormat) -> bytes:
    """``codes`` (any shape, integers) flat in row-major order, written in ``form``."""
    flat = np.ascontiguousarray(codes).reshape(-1).astype(np.int64)
    if form == CodeFormat.I16:
        _check_range(flat, -32768, 32767, form)
        return flat.astype("<i2").tobytes()
    if form == CodeFormat.I8:
        _check_range(flat, -128, 127, form)
        return flat.astype("i1").tobytes()
    if form == CodeFormat.I8_ESCAPED:
        _check_range(flat, -32768, 32767, form)
        wide = (flat < -127) | (flat > 127)
        if not wide.any():
            return flat.astype("i1").tobytes()
        sizes = np.where(wide, 3, 1)
        starts = np.cumsum(sizes) - sizes
        out = np.zeros(int(sizes.sum()), dtype=np.uint8)
        out[starts[~wide]] = flat[~wide].astype("i1").view(np.uint8)
        at = starts[wide]
        out[at] = MARKER
        pairs = flat[wide].astype("<i2").view(np.uint8).reshape(-1, 2)
        out[at + 1], out[at + 2] = pairs[:, 0], pairs[:, 1]
        return out.tobytes()
    _check_range(flat, -127, 127, form)
    return _zero_runs(flat.astype("i1").view(np.uint8))


def _check_range(flat: np.ndarray, low: int, high: int, form: CodeFormat) -> None:
    if flat.size and (flat.min() < low or flat.max() > high):
        raise PayloadError(f"codes outside {low}..{high} cannot be written in format {int(form)} ({form.name})")


def _zero_runs(data: np.ndarray) -> bytes:
    """Runs of SHORTEST_RUN or more zeros as (0x80, n) pairs, n <= LONGEST_RUN."""
    zero = np.concatenate(([False], data == 0, [False]))
    edges = np.flatnonzero(zero[1:] != zero[:-1])
    starts, ends = edges[0::2], edges[1::2]
    long = ends - starts >= SHORTEST_RUN
    if not long.any():
        return data.tobytes()
    parts, position = [], 0
    for start, end in zip(starts[long].tolist(), ends[long].tolist()):
        parts.append(data[position:start].tobytes())
        length = end - start
        whole, rest = divmod(length, LONGEST_RUN)
        parts.append(bytes((MARKER, LONGEST_RUN)) * whole)
        if rest >= SHORTEST_RUN:
            parts.append(bytes((MARKER, rest)))
        else:
            parts.append(bytes(rest))
        position = end
    parts.append(data[position:].tobytes())
    return b"".join(parts)


def decode_codes(payload: bytes, offset: int, count: int, form: CodeFormat, what: str) -> tuple[np.ndarray, int]:
    """``count`` codes written in ``form`` from ``payload[offset:]``, as int16 or int8 (the
    format's own width), and the offset just past them."""
    if form in (CodeFormat.I8, CodeFormat.I16):
        size = count * (1 if form == CodeFormat.I8 else 2)
        if len(payload) - offset < size:
            raise PayloadError(f"{what}: {count} codes need {size} bytes, {len(payload) - offset} remain")
        dtype = "i1" if form == CodeFormat.I8 else "<i2"
        codes = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
        return codes.astype(np.int8 if form == CodeFormat.I8 else np.int16), offset + size
    escaped = form == CodeFormat.I8_ESCAPED
    out = np.zeros(count, dtype=np.int16 if escaped else np.int8)
    filled, position = 0, offset
    view = memoryview(payload)
    while filled < count:
        marker = payload.find(MARKER, position, position + (count - filled))
        plain_end = marker if marker >= 0 else min(len(payload), position + (count - filled))
        plain = np.frombuffer(view[position:plain_end], dtype="i1")
        out[filled : filled + plain.size] = plain
        filled += plain.size
        position = plain_end
        if marker < 0:
            if filled < count:
                raise PayloadError(f"{what}: payload ends after {filled} of {count} codes")
            break
        if escaped:
            if marker + 3 > len(payload):
                raise PayloadError(f"{what}: an escape at byte {marker} is cut short")
            out[filled] = int.from_bytes(payload[marker + 1 : marker + 3], "little", signed=True)
            filled += 1
            position = marker + 3
        else:
            if marker + 2 > len(payload):
                raise PayloadError(f"{what}: a zero run at byte {marker} is cut short")
            run = payload[marker + 1]
            if not 1 <= run <= count - filled:
                raise PayloadError(f"{what}: a zero run of {run} at byte {marker} does not fit the {count - filled} codes left")
            filled += run  # already zero
            position = marker + 2
    return out, position
