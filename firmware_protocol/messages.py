"""The message catalogue: typed messages <-> payload bytes (all little-endian; SPEC.md §4).

Bulk fields are numpy arrays. A payload may exceed one frame's MAX_PAYLOAD: the link layer
splits it into fragments (``fragments``) and reassembles it (``Reassembler``), SPEC.md §3.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import ClassVar

import numpy as np

from firmware_protocol.codes import code_format, decode_codes, encode_codes
from firmware_protocol.errors import PayloadError, ProtocolError, UnknownMessageError
from firmware_protocol.framing import FLAG_MORE, MAX_PAYLOAD, Frame


class ErrorCode(IntEnum):
    BAD_CRC = 1
    UNKNOWN_MESSAGE = 2
    BAD_LENGTH = 3
    OUT_OF_RANGE = 4
    BUSY = 5
    INTERNAL = 6
    UNSUPPORTED_VERSION = 7
    NO_PENDING_REPLY = 8
    UNSUPPORTED = 9


class CapabilityBit(IntEnum):
    """The bits of INFO.capabilities, each named as the host's capability it stands for."""

    analog_products = 0x01
    transpose = 0x02
    pulses = 0x04
    write_verify = 0x08
    reference = 0x10
    adc_range = 0x40  # SET_ADC_RANGE (SPEC.md §8.6)


# INFO.capabilities bit 5: the board reads windows (SPEC.md §8.5). A feature of the firmware,
# not of a tile, so it has no Capability of the Tile interface; a host sends a window only to
# a board that sets it (a board without it ignores the bits and bytes that name one).
WINDOWS_BIT = 0x20
FORWARD_WINDOW = 0x02  # FORWARD flags bit 1: an origin (u16 row, u16 col) follows the header


REGISTRY: dict[int, type["Message"]] = {}


def _array(payload: bytes, offset: int, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    count = math.prod(shape)
    size = np.dtype(dtype).itemsize * count
    if len(payload) - offset != size:
        raise PayloadError(f"{what}: expected {size} bytes of data for shape {shape}, got {len(payload) - offset}")
    return np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


def _head(fmt: struct.Struct, payload: bytes, what: str) -> tuple:
    if len(payload) < fmt.size:
        raise PayloadError(f"{what}: payload of {len(payload)} bytes is shorter than its {fmt.size}-byte header")
    return fmt.unpack_from(payload)


def _code_dtype(code_bytes: int, what: str) -> str:
    if code_bytes not in (1, 2):
        raise PayloadError(f"{what}: code_bytes must be 1 or 2, got {code_bytes}")
    return "<i1" if code_bytes == 1 else "<i2"


@dataclass(frozen=True, eq=False)
class Message:
    TYPE: ClassVar[int]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.TYPE] = cls

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: bytes) -> "Message":
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                    return False
            elif a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
                return False
        return True


def _simple(fmt: str, *names: str):
    """A message made only of fixed-width fields."""
    layout = struct.Struct("<" + fmt)

    def encode(self) -> bytes:
        try:
            return layout.pack(*(getattr(self, n) for n in names))
        except struct.error as error:
            raise ProtocolError(f"{type(self).__name__}: {error}") from None

    @classmethod
    def decode(cls, payload: bytes):
        if len(payload) != layout.size:
            raise PayloadError(f"{cls.__name__}: payload must be {layout.size} bytes, got {len(payload)}")
        return cls(*layout.unpack(payload))

    return encode, decode


@dataclass(frozen=True, eq=False)
class Hello(Message):
    TYPE = 0x01
    protocol_version: int
    encode, decode = _simple("B", "protocol_version")


@dataclass(frozen=True, eq=False)
class Info(Message):
    TYPE = 0x81
    protocol_version: int
    firmware_major: int
    firmware_minor: int
    firmware_patch: int
    tiles: int
    rows: int
    cols: int
    input_bits: int
    output_bits: int
    levels: int
    capabilities: int
    clock_hz: int
    g_min_us: float
    g_max_us: float
    v_read: float
    forward_lsb_ua: float
    backward_lsb_ua: float
    read_lsb_us: float
    max_payload: int
    max_pulses_per_call: int
    default_tolerance_us: float
    default_max_trials: int
    encode, decode = _simple("BBBBHHHBBHBxIffffffHHfH",
        "protocol_version", "firmware_major", "firmware_minor", "firmware_patch", "tiles", "rows", "cols",
        "input_bits", "output_bits", "levels", "capabilities", "clock_hz", "g_min_us", "g_max_us", "v_read",
        "forward_lsb_ua", "backward_lsb_ua", "read_lsb_us", "max_payload", "max_pulses_per_call",
        "default_tolerance_us", "default_max_trials",
    )


_PRODUCT_HEAD = struct.Struct("<BBBxH")  # tile, flags, code_bytes, pad, batch
_FORWARD_HEAD = struct.Struct("<BBBxHH")  # the same, then outputs
_ORIGIN = struct.Struct("<HH")  # a window's corner: row, col (SPEC.md §8.5)
_WINDOWED_HEAD = struct.Struct("<BBBxHHHH")  # FORWARD's header, then the origin


def _codes_bytes(message: Message) -> bytes:
    codes = np.ascontiguousarray(message.codes)
    if codes.ndim != 2 or codes.dtype not in (np.int8, np.int16):
        raise ProtocolError(f"{type(message).__name__}: codes must be a 2-D int8 or int16 array")
    return codes.astype(codes.dtype.newbyteorder("<")).tobytes()


def _codes_from(payload: bytes, head: struct.Struct, code_bytes: int, batch: int, name: str) -> np.ndarray:
    """The (batch, width) codes after ``head``; the width follows from the payload's length."""
    dtype = _code_dtype(code_bytes, name)
    data = len(payload) - head.size
    if batch == 0 or data % (batch * code_bytes):
        raise PayloadError(f"{name}: {data} data bytes do not split into {batch} samples")
    codes = _array(payload, head.size, dtype, (batch, data // (batch * code_bytes)), name)
    return codes.astype(np.dtype(dtype).newbyteorder("="))


@dataclass(frozen=True, eq=False)
class Forward(Message):
    """A batch of signed input codes (batch, width) driving the first ``width`` inputs, and how
    many of the first outputs to convert; transpose=True runs the transposed array.

    ``origin`` (row, col) runs it on the window at that corner instead (SPEC.md §8.5): the
    codes drive inputs from the window's first (row, or column when transposed) and the
    outputs are converted from its first column (row), so no padding travels."""

    TYPE = 0x02
    tile: int
    transpose: bool
    codes: np.ndarray
    outputs: int
    origin: tuple[int, int] | None = None

    def encode(self) -> bytes:
        body = _codes_bytes(self)
        flags = int(self.transpose) | (FORWARD_WINDOW if self.origin is not None else 0)
        head = _FORWARD_HEAD.pack(self.tile, flags, self.codes.dtype.itemsize, self.codes.shape[0], self.outputs)
        if self.origin is None:
            return head + body
        try:
            return head + _ORIGIN.pack(*self.origin) + body
        except struct.error as error:
            raise ProtocolError(f"Forward: origin {self.origin}: {error}") from None

    @classmethod
    def decode(cls, payload: bytes) -> Forward:
        tile, flags, code_bytes, batch, outputs = _head(_FORWARD_HEAD, payload, cls.__name__)
        if not flags & FORWARD_WINDOW:
            return cls(tile, bool(flags & 1), _codes_from(payload, _FORWARD_HEAD, code_bytes, batch, cls.__name__), outputs)
        head = _WINDOWED_HEAD
        row, col = _head(head, payload, cls.__name__)[-2:]
        return cls(tile, bool(flags & 1), _codes_from(payload, head, code_bytes, batch, cls.__name__), outputs, (row, col))


@dataclass(frozen=True, eq=False)
class Products(Message):
    """The ADC codes (batch, outputs) of a Forward."""

    TYPE = 0x82
    tile: int
    transpose: bool
    codes: np.ndarray

    def encode(self) -> bytes:
        body = _codes_bytes(self)
        return _PRODUCT_HEAD.pack(self.tile, int(self.transpose), self.codes.dtype.itemsize, self.codes.shape[0]) + body

    @classmethod
    def decode(cls, payload: bytes) -> Products:
        tile, flags, code_bytes, batch = _head(_PRODUCT_HEAD, payload, cls.__name__)
        return cls(tile, bool(flags & 1), _codes_from(payload, _PRODUCT_HEAD, code_bytes, batch, cls.__name__))


_WINDOW = struct.Struct("<BBHHHH")  # tile, array, r0, r1, c0, c1


@dataclass(frozen=True, eq=False)
class ReadMap(Message):
    """Read a window of the weight (array 0) or reference (array 1) devices."""

    TYPE = 0x03
    tile: int
    array: int
    r0: int
    r1: int
    c0: int
    c1: int
    encode, decode = _simple("BBHHHH", "tile", "array", "r0", "r1", "c0", "c1")


@dataclass(frozen=True, eq=False)
class Map(Message):
    """Conductance read codes (u16, value = code x INFO.read_lsb_us) of a window, row-major."""

    TYPE = 0x83
    tile: int
    array: int
    r0: int
    r1: int
    c0: int
    c1: int
    codes: np.ndarray

    def encode(self) -> bytes:
        head = _WINDOW.pack(self.tile, self.array, self.r0, self.r1, self.c0, self.c1)
        return head + np.ascontiguousarray(self.codes, dtype="<u2").tobytes()

    @classmethod
    def decode(cls, payload: bytes) -> "Map":
        tile, array, r0, r1, c0, c1 = _head(_WINDOW, payload, "Map")
        if r1 < r0 or c1 < c0:
            raise PayloadError(f"Map: inverted window rows {r0}..{r1}, cols {c0}..{c1}")
        codes = _array(payload, _WINDOW.size, "<u2", (r1 - r0, c1 - c0), "Map")
        return cls(tile, array, r0, r1, c0, c1, codes.astype(np.uint16))


_SPARSE_HEAD = struct.Struct("<BxH")
_SPARSE_ENTRY = np.dtype([("row", "<u2"), ("col", "<u2"), ("pulses", "<i2")])


@dataclass(frozen=True, eq=False)
class PulsesSparse(Message):
    """Signed pulse counts for listed devices: entries (row, col, pulses)."""

    TYPE = 0x04
    tile: int
    rows: np.ndarray
    cols: np.ndarray
    pulses: np.ndarray

    def encode(self) -> bytes:
        entries = np.zeros(len(self.rows), dtype=_SPARSE_ENTRY)
        entries["row"], entries["col"], entries["pulses"] = self.rows, self.cols, self.pulses
        return _SPARSE_HEAD.pack(self.tile, len(entries)) + entries.tobytes()

    @classmethod
    def decode(cls, payload: bytes) -> "PulsesSparse":
        tile, count = _head(_SPARSE_HEAD, payload, "PulsesSparse")
        entries = _array(payload, _SPARSE_HEAD.size, _SPARSE_ENTRY, (count,), "PulsesSparse")
        return cls(tile, entries["row"].astype(np.uint16), entries["col"].astype(np.uint16), entries["pulses"].astype(np.int16))


_MATRIX_HEAD = struct.Struct("<BBHH")  # tile, kind/array, rows, cols


def _matrix_message(name: str, dtype: str, kind_field: str):
    """A message carrying one (rows, cols) matrix of ``dtype`` after a tile/kind/shape header."""

    def encode(self) -> bytes:
        values = np.ascontiguousarray(self.values, dtype=dtype)
        return _MATRIX_HEAD.pack(self.tile, getattr(self, kind_field), *values.shape) + values.tobytes()

    @classmethod
    def decode(cls, payload: bytes):
        tile, kind, rows, cols = _head(_MATRIX_HEAD, payload, name)
        values = _array(payload, _MATRIX_HEAD.size, dtype, (rows, cols), name)
        return cls(tile, kind, values.astype(np.dtype(dtype).newbyteorder("=")))

    return encode, decode


@dataclass(frozen=True, eq=False)
class PulsesDense(Message):
    """Signed pulse counts for every device of the tile (rows, cols), int16."""

    TYPE = 0x05
    tile: int
    reserved: int
    values: np.ndarray
    encode, decode = _matrix_message("PulsesDense", "<i2", "reserved")


@dataclass(frozen=True, eq=False)
class PulsesApplied(Message):
    """The pulses actually applied: kind 0 answers PulsesSparse (shape 1 x count, in its
    order), kind 1 answers PulsesDense (rows x cols)."""

    TYPE = 0x84
    tile: int
    kind: int
    values: np.ndarray
    encode, decode = _matrix_message("PulsesApplied", "<i2", "kind")


_PROGRAM_HEAD = struct.Struct("<BBHfHH")  # tile, array, max_trials, tolerance_us, rows, cols


@dataclass(frozen=True, eq=False)
class Program(Message):
    """Write-verify devices of one array to target conductances (f32 uS; NaN = leave alone)."""

    TYPE = 0x06
    tile: int
    array: int
    max_trials: int
    tolerance_us: float
    targets: np.ndarray

    def encode(self) -> bytes:
        targets = np.ascontiguousarray(self.targets, dtype="<f4")
        head = _PROGRAM_HEAD.pack(self.tile, self.array, self.max_trials, self.tolerance_us, *targets.shape)
        return head + targets.tobytes()

    @classmethod
    def decode(cls, payload: bytes) -> "Program":
        tile, array, trials, tolerance, rows, cols = _head(_PROGRAM_HEAD, payload, "Program")
        targets = _array(payload, _PROGRAM_HEAD.size, "<f4", (rows, cols), "Program")
        return cls(tile, array, trials, tolerance, targets.astype(np.float32))


_REPORT_ENTRY = np.dtype([("reached_us", "<f4"), ("trials", "<u2"), ("failed", "u1")])


@dataclass(frozen=True, eq=False)
class ProgramReport(Message):
    """Per device: last verify read (NaN if not programmed), trials used, failed flag."""

    TYPE = 0x86
    tile: int
    array: int
    reached_us: np.ndarray
    trials: np.ndarray
    failed: np.ndarray

    def encode(self) -> bytes:
        entries = np.zeros(self.reached_us.shape, dtype=_REPORT_ENTRY)
        entries["reached_us"], entries["trials"], entries["failed"] = self.reached_us, self.trials, self.failed
        return _MATRIX_HEAD.pack(self.tile, self.array, *entries.shape) + entries.tobytes()

    @classmethod
    def decode(cls, payload: bytes) -> "ProgramReport":
        tile, array, rows, cols = _head(_MATRIX_HEAD, payload, "ProgramReport")
        entries = _array(payload, _MATRIX_HEAD.size, _REPORT_ENTRY, (rows, cols), "ProgramReport")
        return cls(
            tile, array, entries["reached_us"].astype(np.float32), entries["trials"].astype(np.uint16),
            entries["failed"].astype(bool),
        )


@dataclass(frozen=True, eq=False)
class ReadCounters(Message):
    TYPE = 0x07
    tile: int
    encode, decode = _simple("B", "tile")


@dataclass(frozen=True, eq=False)
class CountersReply(Message):
    TYPE = 0x87
    tile: int
    cycles: int
    products: int
    transpose_products: int
    pulses: int
    device_reads: int
    verify_trials: int
    energy_nj: float
    encode, decode = _simple("BxxxxxxxQQQQQQd",
        "tile", "cycles", "products", "transpose_products", "pulses", "device_reads", "verify_trials", "energy_nj",
    )


@dataclass(frozen=True, eq=False)
class Reset(Message):
    """mode 0: zero the counters; mode 1: the whole board to its power-on state."""

    TYPE = 0x08
    mode: int
    encode, decode = _simple("B", "mode")


@dataclass(frozen=True, eq=False)
class Next(Message):
    """Ask for piece ``piece`` (1, 2, ...) of the pending reply; piece 0 answered the
    request's last fragment. Naming the piece makes NEXT safe to repeat, so a host may keep
    several in flight (SPEC.md §8.4)."""

    TYPE = 0x09
    piece: int
    encode, decode = _simple("I", "piece")


@dataclass(frozen=True, eq=False)
class Ack(Message):
    """Receipt of a request fragment (MORE set), or completion of Reset."""

    TYPE = 0x80
    acked_type: int
    encode, decode = _simple("B", "acked_type")


_ERROR_HEAD = struct.Struct("<BB")


@dataclass(frozen=True, eq=False)
class Error(Message):
    """A refused request: a numbered code, the request type, and a UTF-8 explanation."""

    TYPE = 0xFF
    code: int
    request_type: int
    text: str = ""

    def encode(self) -> bytes:
        return _ERROR_HEAD.pack(self.code, self.request_type) + self.text.encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> "Error":
        code, request_type = _head(_ERROR_HEAD, payload, "Error")
        try:
            text = payload[_ERROR_HEAD.size :].decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("Error: text is not UTF-8") from None
        return cls(code, request_type, text)


# ---- version 3: named-device write-verify and layer products (SPEC.md §8) -----------------

_DEVICES_HEAD = struct.Struct("<HfBxH")  # max_trials, tolerance_us, target_format, groups
_GROUP_HEAD = struct.Struct("<HBxH")  # tile, array, count
_TARGET_DTYPES = {1: "u1", 2: "<u2", 3: "<f4"}  # level index u8, level index u16, f32 uS


def _target_format(targets: np.ndarray) -> int:
    for form, dtype in _TARGET_DTYPES.items():
        if targets.dtype == np.dtype(dtype):
            return form
    raise ProtocolError(f"ProgramDevices: targets must be uint8 or uint16 level indices or float32 uS, got {targets.dtype}")


@dataclass(frozen=True, eq=False)
class ProgramDevices(Message):
    """Write-verify named devices of any tiles and either array in one request.

    Per device (parallel arrays, in the request's order): its tile, array (0 weight, 1
    reference), place (row x cols + col) and target: a level index (uint8/uint16) or uS
    (float32). On the wire, each maximal run of devices with the same tile and array is one
    group, so a device costs its place and its target: 3 bytes with u8 levels.
    """

    TYPE = 0x0A
    max_trials: int
    tolerance_us: float
    tiles: np.ndarray
    arrays: np.ndarray
    places: np.ndarray
    targets: np.ndarray

    def encode(self) -> bytes:
        form = _target_format(self.targets)
        tiles, arrays = np.asarray(self.tiles, dtype=np.int64), np.asarray(self.arrays, dtype=np.int64)
        if not (len(tiles) == len(arrays) == len(self.places) == len(self.targets)):
            raise ProtocolError("ProgramDevices: tiles, arrays, places and targets must have one entry per device")
        cuts = np.flatnonzero((np.diff(tiles) != 0) | (np.diff(arrays) != 0)) + 1
        bounds = [0, *cuts.tolist(), len(tiles)] if len(tiles) else [0]
        places = np.ascontiguousarray(self.places, dtype="<u2")
        targets = np.ascontiguousarray(self.targets, dtype=_TARGET_DTYPES[form])
        parts = [_DEVICES_HEAD.pack(self.max_trials, self.tolerance_us, form, len(bounds) - 1)]
        for start, end in zip(bounds, bounds[1:]):
            parts.append(_GROUP_HEAD.pack(int(tiles[start]), int(arrays[start]), end - start))
            parts.append(places[start:end].tobytes())
            parts.append(targets[start:end].tobytes())
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes) -> "ProgramDevices":
        trials, tolerance, form, groups = _head(_DEVICES_HEAD, payload, "ProgramDevices")
        if form not in _TARGET_DTYPES:
            raise PayloadError(f"ProgramDevices: target format {form} is none of 1 (u8 level), 2 (u16 level), 3 (f32 uS)")
        dtype = np.dtype(_TARGET_DTYPES[form])
        offset, tiles, arrays, places, targets = _DEVICES_HEAD.size, [], [], [], []
        for group in range(groups):
            if len(payload) - offset < _GROUP_HEAD.size:
                raise PayloadError(f"ProgramDevices: payload ends inside the header of group {group} of {groups}")
            tile, array, count = _GROUP_HEAD.unpack_from(payload, offset)
            offset += _GROUP_HEAD.size
            size = count * (2 + dtype.itemsize)
            if len(payload) - offset < size:
                raise PayloadError(f"ProgramDevices: group {group} names {count} devices, the payload ends before them")
            places.append(np.frombuffer(payload, "<u2", count, offset))
            targets.append(np.frombuffer(payload, dtype, count, offset + 2 * count))
            tiles.append(np.full(count, tile, np.uint16))
            arrays.append(np.full(count, array, np.uint8))
            offset += size
        if offset != len(payload):
            raise PayloadError(f"ProgramDevices: {len(payload) - offset} bytes after the last of {groups} groups")
        join = lambda parts, kind: np.concatenate(parts).astype(kind) if parts else np.zeros(0, kind)  # noqa: E731
        return cls(trials, tolerance, join(tiles, np.uint16), join(arrays, np.uint8), join(places, np.uint16),
                   join(targets, dtype.newbyteorder("=")))


_REPORT_HEAD = struct.Struct("<I")
_DEVICE_REPORT = np.dtype([("reached_code", "<u2"), ("trials", "u1")])
MAX_REPORTED_TRIALS = 255  # DEVICES_REPORT carries each device's trials in a u8 (SPEC.md §8.2)


@dataclass(frozen=True, eq=False)
class DevicesReport(Message):
    """Per device of a ProgramDevices, in its order: the last verify read as a read code
    (uS = code x INFO.read_lsb_us), the trials used, and whether it failed (a bit each)."""

    TYPE = 0x8A
    reached_codes: np.ndarray
    trials: np.ndarray
    failed: np.ndarray

    def encode(self) -> bytes:
        entries = np.zeros(len(self.reached_codes), dtype=_DEVICE_REPORT)
        entries["reached_code"], entries["trials"] = self.reached_codes, self.trials
        bits = np.packbits(np.asarray(self.failed, dtype=bool), bitorder="little")
        return _REPORT_HEAD.pack(len(entries)) + entries.tobytes() + bits.tobytes()

    @classmethod
    def decode(cls, payload: bytes) -> "DevicesReport":
        (count,) = _head(_REPORT_HEAD, payload, "DevicesReport")
        size = _REPORT_HEAD.size + 3 * count + (count + 7) // 8
        if len(payload) != size:
            raise PayloadError(f"DevicesReport: {count} devices take {size} bytes, got {len(payload)}")
        entries = np.frombuffer(payload, _DEVICE_REPORT, count, _REPORT_HEAD.size)
        bits = np.frombuffer(payload, np.uint8, (count + 7) // 8, _REPORT_HEAD.size + 3 * count)
        failed = np.unpackbits(bits, count=count, bitorder="little").astype(bool)
        return cls(entries["reached_code"].astype(np.uint16), entries["trials"].astype(np.uint8), failed)


@dataclass(frozen=True)
class Geometry:
    """A convolution's geometry on the wire (SPEC.md §8.3): image layout, kernel, stride,
    padding, dilation, each (height, width)."""

    channel_order: int  # 0: each image C, H, W; 1: H, W, C
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<BxHHH8B")

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.channel_order, self.channels, self.height, self.width,
                                *self.kernel, *self.stride, *self.padding, *self.dilation)

    @classmethod
    def decode_from(cls, payload: bytes, offset: int) -> "Geometry":
        if len(payload) - offset < cls.LAYOUT.size:
            raise PayloadError("LayerForward: payload ends inside the convolution geometry")
        order, channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw = cls.LAYOUT.unpack_from(payload, offset)
        return cls(order, channels, height, width, (kh, kw), (sh, sw), (ph, pw), (dh, dw))

    @property
    def image_size(self) -> int:
        return self.channels * self.height * self.width


_LAYER_HEAD = struct.Struct("<BBBBHHHBB")  # in_format, out_format, row_blocks, col_blocks, in, out, batch, convolution, windows


@dataclass(frozen=True, eq=False)
class LayerForward(Message):
    """Forward products of one layer cut over a grid of tiles, its row blocks' ADC codes summed
    on the board: the host sends each sample once (or each image once, with ``geometry``: the
    board cuts the patches) and gets one set of outputs per layer.

    ``tiles`` (row_blocks x col_blocks, row-major): block (r, c) holds inputs r x rows.. and
    outputs c x cols... ``codes`` (batch, width) int16: width is in_features, or the image's
    C x H x W codes in the geometry's channel order. ``origins`` (blocks, 2) uint16, if given:
    each block's corner (row, col) on its tile, for blocks packed beside others (SPEC.md §8.5).
    """

    TYPE = 0x0B
    in_format: int
    out_format: int
    row_blocks: int
    col_blocks: int
    in_features: int
    out_features: int
    tiles: np.ndarray
    geometry: Geometry | None
    codes: np.ndarray
    origins: np.ndarray | None = None

    def encode(self) -> bytes:
        codes = np.asarray(self.codes)
        if codes.ndim != 2:
            raise ProtocolError("LayerForward: codes must be a 2-D array (batch, width)")
        width = self.geometry.image_size if self.geometry is not None else self.in_features
        if codes.shape[1] != width:
            raise ProtocolError(f"LayerForward: each sample must have {width} codes, got {codes.shape[1]}")
        blocks = self.row_blocks * self.col_blocks
        if len(self.tiles) != blocks:
            raise ProtocolError(f"LayerForward: {self.row_blocks}x{self.col_blocks} blocks need as many tiles, got {len(self.tiles)}")
        if self.origins is None:
            spots = np.ascontiguousarray(self.tiles, dtype="<u2")
        else:
            if np.shape(self.origins) != (blocks, 2):
                raise ProtocolError(f"LayerForward: {blocks} blocks need one origin (row, col) each, got shape "
                                    f"{np.shape(self.origins)}")
            spots = np.column_stack([self.tiles, self.origins]).astype("<u2")
        head = _LAYER_HEAD.pack(self.in_format, self.out_format, self.row_blocks, self.col_blocks, self.in_features,
                                self.out_features, codes.shape[0], int(self.geometry is not None),
                                int(self.origins is not None))
        geometry = self.geometry.encode() if self.geometry is not None else b""
        return head + spots.tobytes() + geometry + encode_codes(codes, code_format(self.in_format, "LayerForward"))

    @classmethod
    def decode(cls, payload: bytes) -> "LayerForward":
        in_format, out_format, row_blocks, col_blocks, inputs, outputs, batch, convolution, windows = _head(
            _LAYER_HEAD, payload, "LayerForward")
        if convolution not in (0, 1):
            raise PayloadError(f"LayerForward: convolution flag {convolution} is neither 0 nor 1")
        if windows not in (0, 1):
            raise PayloadError(f"LayerForward: windows flag {windows} is neither 0 nor 1")
        blocks = row_blocks * col_blocks
        per_block = 3 if windows else 1  # u16 tile, and with windows u16 row, u16 col
        offset = _LAYER_HEAD.size + 2 * per_block * blocks
        if len(payload) < offset:
            raise PayloadError(f"LayerForward: payload ends inside the list of {blocks} tiles")
        spots = np.frombuffer(payload, "<u2", per_block * blocks, _LAYER_HEAD.size).astype(np.uint16).reshape(blocks, per_block)
        tiles, origins = spots[:, 0].copy(), spots[:, 1:].copy() if windows else None
        geometry = None
        if convolution:
            geometry = Geometry.decode_from(payload, offset)
            offset += Geometry.LAYOUT.size
        width = geometry.image_size if geometry is not None else inputs
        flat, end = decode_codes(payload, offset, batch * width, code_format(in_format, "LayerForward"), "LayerForward")
        if end != len(payload):
            raise PayloadError(f"LayerForward: {len(payload) - end} bytes after {batch} samples of {width} codes")
        return cls(in_format, out_format, row_blocks, col_blocks, inputs, outputs, tiles, geometry,
                   flat.astype(np.int16).reshape(batch, width), origins)


_LAYER_REPLY_HEAD = struct.Struct("<BxHI")  # out_format, out_features, rows


@dataclass(frozen=True, eq=False)
class LayerProducts(Message):
    """The summed ADC codes (rows, out_features) of a LayerForward: one row per sample, or per
    patch (image after image, each row-major over the output positions)."""

    TYPE = 0x8B
    out_format: int
    codes: np.ndarray

    def encode(self) -> bytes:
        codes = np.asarray(self.codes)
        if codes.ndim != 2:
            raise ProtocolError("LayerProducts: codes must be a 2-D array (rows, out_features)")
        head = _LAYER_REPLY_HEAD.pack(self.out_format, codes.shape[1], codes.shape[0])
        return head + encode_codes(codes, code_format(self.out_format, "LayerProducts"))

    @classmethod
    def decode(cls, payload: bytes) -> "LayerProducts":
        out_format, outputs, rows = _head(_LAYER_REPLY_HEAD, payload, "LayerProducts")
        flat, end = decode_codes(payload, _LAYER_REPLY_HEAD.size, rows * outputs,
                                 code_format(out_format, "LayerProducts"), "LayerProducts")
        if end != len(payload):
            raise PayloadError(f"LayerProducts: {len(payload) - end} bytes after {rows} x {outputs} codes")
        return cls(out_format, flat.astype(np.int16).reshape(rows, outputs))


@dataclass(frozen=True, eq=False)
class SetAdcRange(Message):
    """Set the full scale (uA) of one tile's forward (direction 0) or transpose (1) ADC; 0 is
    the power-on one (SPEC.md §8.6)."""

    TYPE = 0x0C
    tile: int
    direction: int
    full_scale_ua: float
    encode, decode = _simple("HBxf", "tile", "direction", "full_scale_ua")


@dataclass(frozen=True, eq=False)
class AdcRange(Message):
    """The LSB (uA per code) now in force for that tile and direction: what its codes stand for."""

    TYPE = 0x8C
    tile: int
    direction: int
    lsb_ua: float
    encode, decode = _simple("HBxf", "tile", "direction", "lsb_ua")


def is_request(type_code: int) -> bool:
    """Whether a board executes messages of this type (SPEC.md §4: requests are 0x01-0x3F)."""
    return type_code in REGISTRY and not type_code & 0x80


def decode_message(type_code: int, payload: bytes) -> Message:
    """The typed message of a reassembled payload; only ProtocolError subclasses escape."""
    cls = REGISTRY.get(type_code)
    if cls is None:
        raise UnknownMessageError(f"unknown message type {type_code:#04x}")
    try:
        return cls.decode(payload)
    except ProtocolError:
        raise
    except (ValueError, TypeError, struct.error, OverflowError) as error:
        raise PayloadError(f"{cls.__name__}: {error}") from None


def payload_pieces(payload: bytes, max_payload: int = MAX_PAYLOAD) -> list[bytes]:
    """``payload`` cut into pieces of at most ``max_payload`` bytes; an empty payload is one piece."""
    return [payload[i : i + max_payload] for i in range(0, len(payload), max_payload)] or [b""]


def fragments(message: Message, first_seq: int, max_payload: int = MAX_PAYLOAD) -> list[Frame]:
    """The frames that carry ``message``: payload cut into max_payload pieces, MORE on all but
    the last, consecutive sequence numbers (mod 2^16). An empty payload is one frame."""
    pieces = payload_pieces(message.encode(), max_payload)
    return [
        Frame(message.TYPE, (first_seq + i) & 0xFFFF, piece, FLAG_MORE if i < len(pieces) - 1 else 0)
        for i, piece in enumerate(pieces)
    ]


MAX_MESSAGE = 1 << 20  # the largest reassembled payload, either direction (SPEC.md §2)


class Reassembler:
    """Collects the fragments of one message; ``add`` returns the message when it is whole.

    A fragment is refused (and the partial message dropped) as soon as the message cannot be
    valid: an unknown type at its first fragment, an empty fragment with MORE, or more than
    ``limit`` bytes in all (SPEC.md §2)."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._type: int | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, frame: Frame) -> Message | None:
        if self._type is not None and frame.type != self._type:
            self.reset()
            raise PayloadError(f"fragment of type {frame.type:#04x} inside a message of type {self._type:#04x}")
        if frame.type not in REGISTRY:
            self.reset()
            raise UnknownMessageError(f"unknown message type {frame.type:#04x}")
        if frame.more and not frame.payload:
            self.reset()
            raise PayloadError("an empty fragment with MORE set: every fragment but the last carries data")
        self._type = frame.type
        self._parts.append(frame.payload)
        self._size += len(frame.payload)
        if self._size > self.limit:
            self.reset()
            raise PayloadError(f"reassembled message exceeds {self.limit} bytes")
        if frame.more:
            return None
        payload, kind = b"".join(self._parts), self._type
        self.reset()
        return decode_message(kind, payload)

    @property
    def assembling(self) -> int | None:
        """The type of the partial message held, None when idle."""
        return self._type

    def reset(self) -> None:
        self._type, self._parts, self._size = None, [], 0
