"""Golden test vectors: example messages, their fields as JSON and their exact wire frames.

``python -m firmware_protocol.vectors`` rewrites vectors/v3.json from ``EXAMPLES``; the tests
check the committed file both ways (and tests/test_spec_vectors.py with a decoder of its own),
and a C implementation can check itself against it. Arrays are written as {"dtype", "shape",
"data"} with NaN as null; a convolution's geometry as an object of its fields; an optional
field at its default (the window of a FORWARD that names none) is left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np

from firmware_protocol import messages as m
from firmware_protocol.framing import VERSION, decode_frame, encode_frame

PATH = Path(__file__).parent / "vectors" / f"v{VERSION}.json"


def _examples() -> list[tuple[str, int, m.Message]]:
    grid = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    targets = np.full((4, 4), np.nan, dtype=np.float32)
    targets[0, 0], targets[2, 3] = 12.5, 30.0
    big_targets = np.linspace(7.6, 31.3, 16 * 16, dtype=np.float32).reshape(16, 16)
    return [
        ("hello", 1, m.Hello(3)),
        ("info", 2, m.Info(3, 0, 3, 0, 4, 64, 64, 8, 8, 16, 31, 100_000_000, 7.5, 31.25, 0.125, 0.25, 0.25,
                             0.125, 1024, 1000, 0.75, 20)),
        ("forward", 3, m.Forward(0, False, np.array([[1, -2, 3], [127, -127, 0]], dtype=np.int8), 2)),
        ("forward_transpose_16bit", 4, m.Forward(2, True, np.array([[1000, -1000]], dtype=np.int16), 64)),
        ("products", 3, m.Products(0, False, np.array([[5, -5], [0, 127]], dtype=np.int8))),
        ("read_map", 5, m.ReadMap(1, 0, 0, 2, 3, 5)),
        ("map", 5, m.Map(1, 0, 0, 2, 3, 5, np.array([[100, 200], [300, 65535]], dtype=np.uint16))),
        ("read_reference_map", 6, m.ReadMap(1, 1, 0, 64, 0, 64)),
        ("pulses_sparse", 7, m.PulsesSparse(3, np.array([0, 63], np.uint16), np.array([1, 2], np.uint16),
                                            np.array([5, -3], np.int16))),
        ("pulses_dense", 8, m.PulsesDense(0, 0, grid)),
        ("pulses_applied_sparse", 7, m.PulsesApplied(3, 0, np.array([[5, -3]], dtype=np.int16))),
        ("pulses_applied_dense", 8, m.PulsesApplied(0, 1, grid)),
        ("program", 9, m.Program(0, 0, 20, 0.75, targets)),
        ("program_reference_fragmented", 65535, m.Program(1, 1, 10, 0.5, big_targets)),
        ("program_report", 9, m.ProgramReport(0, 0, np.where(np.isnan(targets), np.nan, targets + 0.25).astype(np.float32),
                                              (~np.isnan(targets)).astype(np.uint16) * 3,
                                              np.zeros((4, 4), dtype=bool))),
        ("read_counters", 10, m.ReadCounters(2)),
        ("counters", 10, m.CountersReply(2, 72, 1, 0, 4096, 1024, 300, 2.66)),
        ("reset", 11, m.Reset(0)),
        ("next", 12, m.Next(1)),
        ("ack", 12, m.Ack(0x06)),
        ("error", 13, m.Error(m.ErrorCode.OUT_OF_RANGE, 0x06, "target 80 uS outside [7.6, 31.3]")),
        # Version 3 (SPEC.md §8).
        ("program_devices_levels", 20, m.ProgramDevices(
            0, 0.0, np.array([0, 0, 0, 3, 3], np.uint16), np.array([0, 0, 1, 0, 0], np.uint8),
            np.array([3, 4095, 3, 64, 65], np.uint16), np.array([7, 15, 0, 12, 13], np.uint8))),
        ("program_devices_microsiemens", 21, m.ProgramDevices(
            12, 0.5, np.array([2, 2], np.uint16), np.array([1, 1], np.uint8), np.array([10, 20], np.uint16),
            np.array([8.25, 30.0], np.float32))),
        ("devices_report", 20, m.DevicesReport(
            np.array([61, 244, 60, 123, 130], np.uint16), np.array([1, 3, 20, 2, 1], np.uint8),
            np.array([False, False, True, False, False]))),
        ("layer_forward", 22, m.LayerForward(
            4, 3, 2, 1, 84, 10, np.array([2, 3], np.uint16), None,
            np.concatenate([np.zeros((2, 40), np.int16), np.arange(-60, 28, 2, dtype=np.int16).reshape(1, 44)
                            .repeat(2, 0)], axis=1))),
        ("layer_forward_convolution", 23, m.LayerForward(
            4, 3, 1, 1, 9, 2, np.array([0], np.uint16), m.Geometry(0, 1, 5, 5, (3, 3), (2, 2), (1, 1), (1, 1)),
            np.array([[0, 0, 0, 0, 0, 0, 127, 127, 0, 0, 0, 64, -64, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]], np.int16))),
        # Windows (SPEC.md §8.5): a FORWARD on the window at row 25, column 6 of tile 1, its
        # transpose, and a layer of 2 x 1 blocks packed at offsets on tiles 0 and 1.
        ("forward_window", 24, m.Forward(1, False, np.array([[1, -2, 3], [127, -127, 0]], dtype=np.int8), 2, (25, 6))),
        ("forward_window_transpose", 25, m.Forward(1, True, np.array([[-5, 0, 5, 9]], dtype=np.int8), 3, (25, 6))),
        ("layer_forward_windows", 26, m.LayerForward(
            4, 3, 2, 1, 84, 10, np.array([0, 1], np.uint16), None,
            np.concatenate([np.zeros((2, 40), np.int16), np.arange(-60, 28, 2, dtype=np.int16).reshape(1, 44)
                            .repeat(2, 0)], axis=1), np.array([[0, 16], [6, 54]], np.uint16))),
        ("layer_products", 22, m.LayerProducts(3, np.array([[1, -1, 127, -127, 128, -300, 0, 5, 6, 7]], np.int16))),
        ("layer_products_fragmented", 23, m.LayerProducts(
            1, (np.arange(3 * 4 * 2 * 100) % 255 - 127).astype(np.int16).reshape(1200, 2))),
        # SPEC.md §8.6's worked example, and the power-on range of a transpose ADC.
        ("set_adc_range", 24, m.SetAdcRange(1, 0, 8.0)),
        ("adc_range", 24, m.AdcRange(1, 0, float(np.float32(8.0 / 127)))),
        ("set_adc_range_power_on_transpose", 25, m.SetAdcRange(3, 1, 0.0)),
    ]


EXAMPLES = _examples()


def to_json(message: m.Message) -> dict:
    out = {}
    for f in fields(message):
        value = getattr(message, f.name)
        if value is None and f.default is None:
            continue  # an optional part left out (a FORWARD without a window): so is its field
        if isinstance(value, m.Geometry):
            out[f.name] = {g.name: list(v) if isinstance(v, tuple) else v for g, v in
                           ((g, getattr(value, g.name)) for g in fields(value))}
        elif isinstance(value, np.ndarray):
            data = [None if isinstance(v, float) and math.isnan(v) else v for v in value.ravel().tolist()]
            out[f.name] = {"dtype": value.dtype.name, "shape": list(value.shape), "data": data}
        elif isinstance(value, tuple):
            out[f.name] = [int(v) for v in value]
        else:
            out[f.name] = int(value) if isinstance(value, (bool, np.integer)) and not isinstance(value, bool) else value
    return out


def from_json(type_code: int, values: dict) -> m.Message:
    cls = m.REGISTRY[type_code]
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, dict) and "dtype" not in value:
            kwargs[name] = m.Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        elif isinstance(value, dict):
            data = [np.nan if v is None else v for v in value["data"]]
            kwargs[name] = np.array(data, dtype=value["dtype"]).reshape(value["shape"])
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def build() -> list[dict]:
    vectors = []
    for name, seq, message in EXAMPLES:
        frames = m.fragments(message, seq)
        vectors.append({
            "name": name,
            "message": type(message).__name__,
            "type": message.TYPE,
            "first_seq": seq,
            "fields": to_json(message),
            "payload_hex": message.encode().hex(),
            "frames_hex": [encode_frame(frame).hex() for frame in frames],
        })
    return vectors


def check(vectors: list[dict]) -> None:
    """Both directions: fields encode to the frames, frames decode to the fields."""
    for vector in vectors:
        message = from_json(vector["type"], vector["fields"])
        frames = m.fragments(message, vector["first_seq"])
        assert [encode_frame(f).hex() for f in frames] == vector["frames_hex"], vector["name"]
        reassembler = m.Reassembler()
        decoded = [reassembler.add(decode_frame(bytes.fromhex(h)[1:-1])) for h in vector["frames_hex"]]
        assert decoded[-1] == message and all(d is None for d in decoded[:-1]), vector["name"]
        assert to_json(decoded[-1]) == vector["fields"], vector["name"]


if __name__ == "__main__":
    PATH.write_text(json.dumps({"protocol_version": VERSION, "vectors": build()}, indent=1) + "\n")
    print(f"wrote {len(EXAMPLES)} vectors to {PATH}")
