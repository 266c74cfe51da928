"""The golden vectors, checked by a second decoder written from SPEC.md alone.

Nothing here imports ``firmware_protocol``: the CRC, COBS, the frame header and every payload
layout below are re-derived from the spec's tables, so a vector that the codec and this reading
disagree on fails. Each vector is checked both ways: its frames decode to its payload and
fields, and frames assembled here from its payload are byte-identical to its frames.
"""

import json
import math
import re
import struct
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parent.parent / "firmware_protocol" / "vectors"
MAX_PAYLOAD = 1024
MORE = 0x01


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE, bit by bit (§1)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def cobs_encode(data: bytes) -> bytes:
    """COBS as §1 says: a final full block (code 0xFF) is not followed by an empty block."""
    out = bytearray()
    block = bytearray()
    full = False
    for byte in data:
        full = False
        if byte == 0:
            out += bytes([len(block) + 1]) + block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out += b"\xff" + block
                block.clear()
                full = True
    if not full:
        out += bytes([len(block) + 1]) + block
    return bytes(out)


def cobs_decode(chunk: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(chunk):
        code = chunk[i]
        if code == 0:
            raise ValueError("bad COBS")
        block = chunk[i + 1:i + code]
        if len(block) != code - 1:
            raise ValueError("bad COBS")
        out += block
        i += code
        if code != 0xFF and i < len(chunk):
            out.append(0)
    return bytes(out)


def frame(version: int, mtype: int, seq: int, flags: int, payload: bytes) -> bytes:
    body = struct.pack("<BBHBH", version, mtype, seq, flags, len(payload)) + payload
    return b"\x00" + cobs_encode(body + struct.pack("<H", crc16(body))) + b"\x00"


def unframe(wire: bytes, version: int):
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    body = cobs_decode(wire[1:-1])
    assert len(body) >= 9
    assert struct.unpack_from("<H", body, len(body) - 2)[0] == crc16(body[:-2])
    v, mtype, seq, flags, length = struct.unpack_from("<BBHBH", body)
    assert v == version
    assert flags & ~MORE == 0, "flag bits other than MORE are 0"
    assert length <= MAX_PAYLOAD and length == len(body) - 9
    return mtype, seq, flags, body[7:-2]


# ---- payload layouts of §4, as (name, value) pairs in the spec's order -------------------

def _array(fmt: str, count: int, data: bytes, at: int):
    size = struct.calcsize("<" + fmt)
    assert len(data) >= at + count * size, "payload too short for its header"
    return list(struct.unpack_from(f"<{count}{fmt}", data, at)), at + count * size


def hello(p):
    assert len(p) == 1
    return {"protocol_version": p[0]}


INFO_LAYOUT = ("<BBBBHHHBBHBBIffffffHHfH", [
    "protocol_version", "firmware_major", "firmware_minor", "firmware_patch", "tiles", "rows",
    "cols", "input_bits", "output_bits", "levels", "capabilities", "reserved", "clock_hz",
    "g_min_us", "g_max_us", "v_read", "forward_lsb_ua", "backward_lsb_ua", "read_lsb_us",
    "max_payload", "max_pulses_per_call", "default_tolerance_us", "default_max_trials"])


def info(p):
    fmt, names = INFO_LAYOUT
    assert len(p) == 54 == struct.calcsize(fmt)
    return dict(zip(names, struct.unpack(fmt, p)))


def _codes_fmt(code_bytes):
    assert code_bytes in (1, 2)
    return "b" if code_bytes == 1 else "h"


def forward(p):
    tile, flags, code_bytes, reserved, batch, outputs = struct.unpack_from("<BBBBHH", p)
    body = len(p) - 8
    size = code_bytes
    assert batch >= 1 and body % (batch * size) == 0
    width = body // (batch * size)
    codes, _ = _array(_codes_fmt(code_bytes), batch * width, p, 8)
    return {"tile": tile, "flags": flags, "code_bytes": code_bytes, "reserved": reserved,
            "batch": batch, "outputs": outputs, "codes": (codes, [batch, width])}


def products(p):
    tile, flags, code_bytes, reserved, batch = struct.unpack_from("<BBBBH", p)
    body = len(p) - 6
    assert batch >= 1 and body % (batch * code_bytes) == 0
    outputs = body // (batch * code_bytes)
    codes, _ = _array(_codes_fmt(code_bytes), batch * outputs, p, 6)
    return {"tile": tile, "flags": flags, "code_bytes": code_bytes, "reserved": reserved,
            "batch": batch, "codes": (codes, [batch, outputs])}


def read_map(p):
    assert len(p) == 10
    return dict(zip(["tile", "array", "r0", "r1", "c0", "c1"], struct.unpack("<BBHHHH", p)))


def map_reply(p):
    head = read_map(p[:10])
    n = (head["r1"] - head["r0"]) * (head["c1"] - head["c0"])
    codes, end = _array("H", n, p, 10)
    assert end == len(p)
    return {**head, "codes": (codes, [head["r1"] - head["r0"], head["c1"] - head["c0"]])}


def pulses_sparse(p):
    tile, reserved, count = struct.unpack_from("<BBH", p)
    assert len(p) == 4 + 6 * count
    entries = [struct.unpack_from("<HHh", p, 4 + 6 * i) for i in range(count)]
    return {"tile": tile, "reserved": reserved, "count": count, "entries": entries}


def pulses_dense(p):
    tile, reserved, rows, cols = struct.unpack_from("<BBHH", p)
    values, end = _array("h", rows * cols, p, 6)
    assert end == len(p)
    return {"tile": tile, "reserved": reserved, "rows": rows, "cols": cols,
            "values": (values, [rows, cols])}


def pulses_applied(p):
    tile, kind, d0, d1 = struct.unpack_from("<BBHH", p)
    assert kind in (0, 1)
    values, end = _array("h", d0 * d1, p, 6)
    assert end == len(p)
    return {"tile": tile, "kind": kind, "values": (values, [d0, d1])}


def program(p):
    tile, array, max_trials, tolerance, rows, cols = struct.unpack_from("<BBHfHH", p)
    targets, end = _array("f", rows * cols, p, 12)
    assert end == len(p)
    return {"tile": tile, "array": array, "max_trials": max_trials, "tolerance_us": tolerance,
            "targets": (targets, [rows, cols])}


def program_report(p):
    tile, array, rows, cols = struct.unpack_from("<BBHH", p)
    assert len(p) == 6 + 7 * rows * cols
    entries = [struct.unpack_from("<fHB", p, 6 + 7 * i) for i in range(rows * cols)]
    return {"tile": tile, "array": array, "rows": rows, "cols": cols, "entries": entries}


def read_counters(p):
    assert len(p) == 1
    return {"tile": p[0]}


COUNTER_NAMES = ["cycles", "products", "transpose_products", "pulses", "device_reads",
                 "verify_trials"]


def counters(p):
    assert len(p) == 64
    values = struct.unpack("<B7x6Qd", p)
    return {"tile": values[0], **dict(zip(COUNTER_NAMES + ["energy_nj"], values[1:]))}


def reset(p):
    assert len(p) == 1
    return {"mode": p[0]}


def next_(p):
    assert p == b""
    return {}


def ack(p):
    assert len(p) == 1
    return {"acked_type": p[0]}


def error(p):
    assert len(p) >= 2
    return {"code": p[0], "request_type": p[1], "text": p[2:].decode("utf-8")}


V2 = {0x01: hello, 0x81: info, 0x02: forward, 0x82: products, 0x03: read_map, 0x83: map_reply,
      0x04: pulses_sparse, 0x05: pulses_dense, 0x84: pulses_applied, 0x06: program,
      0x86: program_report, 0x07: read_counters, 0x87: counters, 0x08: reset, 0x09: next_,
      0x80: ack, 0xFF: error}


# ---- version 3 (§8), read from the spec's tables ------------------------------------------

def codes_v3(fmt: int, count: int, p: bytes, at: int):
    """§8.1: ``count`` codes in format ``fmt`` from ``p[at:]``, byte by byte."""
    if fmt in (1, 2):
        return _array("b" if fmt == 1 else "h", count, p, at)
    assert fmt in (3, 4)
    out = []
    while len(out) < count:
        byte = p[at]
        if byte != 0x80:
            out.append(byte - 256 if byte > 127 else byte)
            at += 1
        elif fmt == 3:
            out.append(struct.unpack_from("<h", p, at + 1)[0])
            at += 3
        else:
            assert 1 <= p[at + 1] <= count - len(out)
            out += [0] * p[at + 1]
            at += 2
    return out, at


def forward_v3(p):
    """§4.2 with §8.5: flags bit 1 (WINDOW) puts u16 row_offset, u16 col_offset after the header."""
    tile, flags, code_bytes, reserved, batch, outputs = struct.unpack_from("<BBBBHH", p)
    assert flags & ~0x03 == 0, "flag bits 2-7 are reserved"
    if not flags & 0x02:
        return forward(p)
    row, col = struct.unpack_from("<HH", p, 8)
    body = len(p) - 12
    assert batch >= 1 and body % (batch * code_bytes) == 0
    width = body // (batch * code_bytes)
    codes, _ = _array(_codes_fmt(code_bytes), batch * width, p, 12)
    return {"tile": tile, "flags": flags, "code_bytes": code_bytes, "reserved": reserved,
            "batch": batch, "outputs": outputs, "origin": [row, col], "codes": (codes, [batch, width])}


def next_v3(p):
    assert len(p) == 4
    return {"piece": struct.unpack("<I", p)[0]}


def program_devices(p):
    max_trials, tolerance, target_format, reserved, groups = struct.unpack_from("<HfBBH", p)
    assert reserved == 0
    fmt = {1: "B", 2: "H", 3: "f"}[target_format]
    at, devices = 10, []
    for _ in range(groups):
        tile, array, reserved, count = struct.unpack_from("<HBBH", p, at)
        assert reserved == 0
        places, at = _array("H", count, p, at + 6)
        targets, at = _array(fmt, count, p, at)
        devices += [(tile, array, place, target) for place, target in zip(places, targets)]
    assert at == len(p)
    return {"max_trials": max_trials, "tolerance_us": tolerance, "target_format": target_format,
            "devices": devices}


def devices_report(p):
    (count,) = struct.unpack_from("<I", p)
    assert len(p) == 4 + 3 * count + (count + 7) // 8
    entries = [struct.unpack_from("<HB", p, 4 + 3 * i) for i in range(count)]
    bits = p[4 + 3 * count:]
    failed = [(bits[i // 8] >> (i % 8)) & 1 for i in range(count)]
    return {"entries": [(code, trials, bit) for (code, trials), bit in zip(entries, failed)]}


def layer_forward(p):
    in_fmt, out_fmt, rows, cols, inputs, outputs, batch, conv, windows = struct.unpack_from("<BBBBHHHBB", p)
    assert conv in (0, 1) and windows in (0, 1)
    entries, at = _array("H", rows * cols * (3 if windows else 1), p, 12)  # §8.5: (tile, row, col) with windows
    tiles = entries[::3] if windows else entries
    out = {"in_format": in_fmt, "out_format": out_fmt, "row_blocks": rows, "col_blocks": cols,
           "in_features": inputs, "out_features": outputs, "tiles": tiles, "geometry": None}
    if windows:
        out["origins"] = ([value for i, value in enumerate(entries) if i % 3], [rows * cols, 2])
    width = inputs
    if conv:
        order, reserved, channels, height, image_width = struct.unpack_from("<BBHHH", p, at)
        assert reserved == 0
        kh, kw, sh, sw, ph, pw, dh, dw = struct.unpack_from("<8B", p, at + 8)
        out["geometry"] = {"channel_order": order, "channels": channels, "height": height, "width": image_width,
                           "kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw], "dilation": [dh, dw]}
        width, at = channels * height * image_width, at + 16
    codes, at = codes_v3(in_fmt, batch * width, p, at)
    assert at == len(p)
    out["codes"] = (codes, [batch, width])
    return out


def layer_products(p):
    out_fmt, reserved, outputs, rows = struct.unpack_from("<BBHI", p)
    assert reserved == 0
    codes, at = codes_v3(out_fmt, rows * outputs, p, 8)
    assert at == len(p)
    return {"out_format": out_fmt, "codes": (codes, [rows, outputs])}


SPEC = VECTORS.parent / "SPEC.md"
SPEC_TYPES = {"u8": "B", "u16": "H", "u32": "I", "i8": "b", "i16": "h", "f32": "f", "f64": "d"}


def spec_section(number: str) -> str:
    """The text of SPEC.md's section ``number`` (e.g. "8.6"), up to the next section."""
    text = SPEC.read_text()
    start = text.index(f"\n### {number} ")
    end = text.find("\n### ", start + 1)
    return text[start : end if end > 0 else len(text)]


def spec_layout(number: str, message: str):
    """A fixed-size message's layout, read from its table in SPEC.md: the struct format and
    the field names (reserved bytes named ``reserved``); the offsets are checked to follow on."""
    section = spec_section(number)
    heading, *lines = section[section.index(f"\n{message} (") + 1 :].splitlines()  # "NAME (8 bytes):"
    size = int(heading.split("(")[1].split()[0])
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].isdigit():
            rows.append(cells)
    fmt, names, offset = "<", [], 0
    for cell_offset, kind, field, *_ in rows:
        assert int(cell_offset) == offset, f"{message}: field {field} at {cell_offset}, expected {offset}"
        fmt += SPEC_TYPES[kind]
        names.append("reserved" if field.startswith("(reserved") else field)
        offset += struct.calcsize("<" + SPEC_TYPES[kind])
    assert struct.calcsize(fmt) == size, f"{message}: its table adds up to {struct.calcsize(fmt)} bytes, not {size}"
    return fmt, names


def spec_decoder(number: str, message: str):
    fmt, names = spec_layout(number, message)

    def decode(p):
        assert len(p) == struct.calcsize(fmt)
        values = dict(zip(names, struct.unpack(fmt, p)))
        assert values.pop("reserved", 0) == 0
        return values

    return decode


V3 = {**V2, 0x02: forward_v3, 0x09: next_v3, 0x0A: program_devices, 0x8A: devices_report, 0x0B: layer_forward,
      0x8B: layer_products, 0x0C: spec_decoder("8.6", "SET_ADC_RANGE"), 0x8C: spec_decoder("8.6", "ADC_RANGE")}


# ---- the vectors' own conventions for fields (SPEC.md §6), mapped onto §4's -----------------

def _vector_array(field):
    data = [math.nan if x is None else x for x in field["data"]]
    return data, list(field["shape"])


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or struct.pack("<f", a) == struct.pack("<f", b) \
            or a == b
    return a == b


def _same_list(a, b):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def expected_from_vector(mtype: int, fields: dict) -> dict:
    """Rewrite a vector's ``fields`` into the decoded form above, per SPEC.md §6: arrays as
    (data, shape), a bool ``transpose`` for FORWARD/PRODUCTS flags, and parallel arrays for
    the records of PULSES_SPARSE and PROGRAM_REPORT."""
    arrays = {key for key, value in fields.items() if isinstance(value, dict) and "data" in value}
    f = {key: _vector_array(value) if key in arrays else value for key, value in fields.items()}
    dtypes = {key: fields[key]["dtype"] for key in arrays}
    if mtype in (0x02, 0x82):
        f["flags"] = int(f.pop("transpose")) | (0x02 if "origin" in f else 0)  # §8.5: WINDOW
        f["code_bytes"] = {"int8": 1, "int16": 2}[dtypes["codes"]]
        f["batch"] = f["codes"][1][0]
        f.setdefault("reserved", 0)
    elif mtype == 0x04:
        rows, cols, pulses = f.pop("rows")[0], f.pop("cols")[0], f.pop("pulses")[0]
        f["entries"] = list(zip(rows, cols, pulses))
        f["count"] = len(rows)
        f.setdefault("reserved", 0)
    elif mtype == 0x05:
        f["rows"], f["cols"] = f["values"][1]
    elif mtype == 0x86:
        reached, shape = f.pop("reached_us")
        trials, failed = f.pop("trials")[0], f.pop("failed")[0]
        f["rows"], f["cols"] = shape
        f["entries"] = [(r, t, int(x)) for r, t, x in zip(reached, trials, failed)]
    elif mtype == 0x81:
        f.setdefault("reserved", 0)
    elif mtype == 0x0A:  # parallel arrays per device; the target format from the targets' dtype
        f["target_format"] = {"uint8": 1, "uint16": 2, "float32": 3}[dtypes["targets"]]
        f["devices"] = list(zip(*(f.pop(key)[0] for key in ("tiles", "arrays", "places", "targets"))))
    elif mtype == 0x8A:
        f["entries"] = [(c, t, int(x)) for c, t, x in zip(*(f.pop(key)[0] for key in ("reached_codes", "trials", "failed")))]
    elif mtype == 0x0B:
        f["tiles"] = f["tiles"][0]
    return f


def _compare(decoded: dict, expected: dict):
    assert set(decoded) == set(expected), (sorted(decoded), sorted(expected))
    for key, got in decoded.items():
        want = expected[key]
        if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], list):
            assert got[1] == want[1], key
            assert _same_list(got[0], want[0]), key
        elif key == "entries":
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert _same_list(list(g), list(w)), key
        else:
            assert _same(got, want), key


def _vector_files():
    return sorted(VECTORS.glob("v*.json"))


def _cases():
    for path in _vector_files():
        doc = json.loads(path.read_text())
        for vector in doc["vectors"]:
            yield pytest.param(doc["protocol_version"], vector, id=f"{path.stem}-{vector['name']}")


DECODERS = {2: V2, 3: V3}


@pytest.mark.parametrize("version,vector", list(_cases()))
def test_vector_frames_decode_to_its_payload_and_fields(version, vector):
    payload = bytes.fromhex(vector["payload_hex"])
    pieces, seq = [], vector["first_seq"]
    frames = [bytes.fromhex(h) for h in vector["frames_hex"]]
    for i, wire in enumerate(frames):
        mtype, got_seq, flags, piece = unframe(wire, version)
        assert mtype == vector["type"]
        assert got_seq == (vector["first_seq"] + i) % 65536 == seq
        assert flags == (MORE if i < len(frames) - 1 else 0)
        assert i == len(frames) - 1 or len(piece) == MAX_PAYLOAD, "pieces are cut full"
        pieces.append(piece)
        seq = (seq + 1) % 65536
    assert b"".join(pieces) == payload
    decoder = DECODERS[version][vector["type"]]
    _compare(decoder(payload), expected_from_vector(vector["type"], vector["fields"]))


@pytest.mark.parametrize("version,vector", list(_cases()))
def test_frames_assembled_from_the_spec_equal_the_vector(version, vector):
    payload = bytes.fromhex(vector["payload_hex"])
    pieces = [payload[i:i + MAX_PAYLOAD] for i in range(0, len(payload), MAX_PAYLOAD)] or [b""]
    wires = [frame(version, vector["type"], (vector["first_seq"] + i) % 65536,
                   MORE if i < len(pieces) - 1 else 0, piece) for i, piece in enumerate(pieces)]
    assert [w.hex() for w in wires] == vector["frames_hex"]


def test_every_message_type_of_the_catalogue_has_a_vector():
    for path in _vector_files():
        doc = json.loads(path.read_text())
        types = {v["type"] for v in doc["vectors"]}
        assert set(DECODERS[doc["protocol_version"]]) <= types


def test_the_worked_examples_of_version_3_read_as_the_spec_says():
    assert codes_v3(4, 7, bytes.fromhex("80040500ff"), 0) == ([0, 0, 0, 0, 5, 0, -1], 5)
    assert codes_v3(3, 3, bytes.fromhex("01802c01fe"), 0) == ([1, 300, -2], 5)
    assert devices_report(bytes.fromhex("020000003d0001f4000302")) == {"entries": [(61, 1, 0), (244, 3, 1)]}
    # §8.5's windowed FORWARD: 18 bytes where the padded request takes 8 + 2 x 28.
    window = bytes.fromhex("01 02 01 00 02 00 02 00 19 00 06 00 01 fe 03 7f 81 00")
    assert forward_v3(window) == {"tile": 1, "flags": 2, "code_bytes": 1, "reserved": 0, "batch": 2, "outputs": 2,
                                  "origin": [25, 6], "codes": ([1, -2, 3, 127, -127, 0], [2, 3])}
    # §8.6: the bytes its worked example writes, read by the layouts its tables give.
    example = spec_section("8.6")
    request = bytes.fromhex(re.search(r"^    payload +([0-9a-f ]+?) +\(", example, re.M).group(1))
    answer = bytes.fromhex(re.search(r"^    ADC_RANGE +([0-9a-f ]+)$", example, re.M).group(1))
    assert V3[0x0C](request) == {"tile": 1, "direction": 0, "full_scale_ua": 8.0}
    reply = V3[0x8C](answer)
    assert (reply["tile"], reply["direction"]) == (1, 0) and struct.pack("<f", reply["lsb_ua"]) == struct.pack("<f", 8 / 127)


def test_crc_check_value_and_cobs_corners_from_the_spec():
    assert crc16(b"123456789") == 0x29B1
    assert cobs_encode(b"") == b"\x01"
    assert cobs_encode(b"\x00") == b"\x01\x01"
    full = bytes(range(1, 255))  # 254 nonzero bytes: one full block
    assert cobs_encode(full) == b"\xff" + full
    assert cobs_encode(full + b"\x00") == b"\xff" + full + b"\x01\x01"
    assert cobs_decode(cobs_encode(full)) == full
    assert cobs_decode(cobs_encode(full + b"\x00")) == full + b"\x00"
