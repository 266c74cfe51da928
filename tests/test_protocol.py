"""firmware_protocol: framing, codec, streaming decoder and the golden vectors."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol import messages as m
from firmware_protocol.errors import (
    BadLengthError,
    CrcError,
    FramingError,
    PayloadError,
    ProtocolError,
    TruncatedFrameError,
    UnknownMessageError,
    VersionError,
)
from firmware_protocol.framing import MAX_PAYLOAD, VERSION, Frame, FrameDecoder, crc16, decode_frame, encode_frame
from firmware_protocol.vectors import EXAMPLES, PATH, check

u8, u16 = st.integers(0, 0xFF), st.integers(0, 0xFFFF)
f32 = st.floats(width=32, allow_nan=False)
shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))


def arrays(dtype, shape, elements):
    return st.lists(elements, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]).map(
        lambda values: np.array(values, dtype=dtype).reshape(shape)
    )


def matrix(dtype, elements):
    return shapes.flatmap(lambda shape: arrays(dtype, shape, elements))


int8s, int16s = st.integers(-128, 127), st.integers(-32768, 32767)

MESSAGES = st.one_of(
    st.builds(m.Hello, u8),
    st.builds(m.Info, u8, u8, u8, u8, u16, u16, u16, u8, u8, u16, u8, st.integers(0, 2**32 - 1),
              f32, f32, f32, f32, f32, f32, u16, u16, f32, u16),
    st.builds(m.Forward, u8, st.booleans(), st.one_of(matrix(np.int8, int8s), matrix(np.int16, int16s)), u16),
    st.builds(m.Products, u8, st.booleans(), st.one_of(matrix(np.int8, int8s), matrix(np.int16, int16s))),
    st.builds(m.ReadMap, u8, u8, u16, u16, u16, u16),
    shapes.flatmap(lambda s: st.builds(m.Map, u8, u8, st.just(0), st.just(s[0]), st.just(3), st.just(3 + s[1]),
                                       arrays(np.uint16, s, u16))),
    st.integers(0, 20).flatmap(lambda n: st.builds(
        m.PulsesSparse, u8, arrays(np.uint16, (1, n), u16).map(np.ravel), arrays(np.uint16, (1, n), u16).map(np.ravel),
        arrays(np.int16, (1, n), int16s).map(np.ravel))),
    st.builds(m.PulsesDense, u8, u8, matrix(np.int16, int16s)),
    st.builds(m.PulsesApplied, u8, u8, matrix(np.int16, int16s)),
    st.builds(m.Program, u8, u8, u16, f32, matrix(np.float32, st.one_of(f32, st.just(float("nan"))))),
    shapes.flatmap(lambda s: st.builds(m.ProgramReport, u8, u8, arrays(np.float32, s, f32), arrays(np.uint16, s, u16),
                                       arrays(bool, s, st.booleans()))),
    st.builds(m.ReadCounters, u8),
    st.builds(m.CountersReply, u8, *[st.integers(0, 2**64 - 1)] * 6, st.floats(allow_nan=False)),
    st.builds(m.Reset, u8),
    st.builds(m.Next, st.integers(0, 2**32 - 1)),
    st.integers(0, 12).flatmap(lambda n: st.builds(
        m.ProgramDevices, u16, f32, arrays(np.uint16, (1, n), st.integers(0, 3)).map(np.ravel),
        arrays(np.uint8, (1, n), st.integers(0, 1)).map(np.ravel), arrays(np.uint16, (1, n), u16).map(np.ravel),
        st.one_of(arrays(np.uint8, (1, n), u8), arrays(np.uint16, (1, n), u16),
                  arrays(np.float32, (1, n), f32)).map(np.ravel))),
    st.integers(0, 20).flatmap(lambda n: st.builds(
        m.DevicesReport, arrays(np.uint16, (1, n), u16).map(np.ravel), arrays(np.uint8, (1, n), u8).map(np.ravel),
        arrays(bool, (1, n), st.booleans()).map(np.ravel))),
    matrix(np.int16, int16s).flatmap(lambda codes: st.builds(
        m.LayerForward, st.just(2), st.sampled_from([1, 2, 3]), st.just(1), st.just(2), st.just(codes.shape[1]), u16,
        arrays(np.uint16, (1, 2), u16).map(np.ravel), st.none(), st.just(codes))),
    st.tuples(st.integers(1, 4), st.integers(1, 3)).flatmap(lambda bw: st.builds(
        m.LayerForward, st.sampled_from([1, 3, 4]), st.just(3), st.just(1), st.just(1), u16, u16,
        arrays(np.uint16, (1, 1), u16).map(np.ravel),
        st.builds(m.Geometry, st.integers(0, 1), st.just(1), st.just(3), st.just(bw[1]), *[st.tuples(u8, u8)] * 4),
        arrays(np.int16, (bw[0], 3 * bw[1]), st.integers(-127, 127)))),
    st.builds(m.LayerProducts, st.sampled_from([2, 3]), matrix(np.int16, int16s)),
    st.builds(m.Ack, u8),
    st.builds(m.Error, st.sampled_from(list(m.ErrorCode)).map(int), u8, st.text(max_size=40)),
)


def wire(message, seq=0, max_payload=MAX_PAYLOAD):
    return b"".join(encode_frame(f) for f in m.fragments(message, seq, max_payload))


def receive(data: bytes):
    decoder, reassembler = FrameDecoder(), m.Reassembler()
    return [msg for frame in decoder.feed(data) if (msg := reassembler.add(frame)) is not None]


@settings(max_examples=300, deadline=None)
@given(MESSAGES, u16, st.sampled_from([16, 100, MAX_PAYLOAD]))
def test_every_message_round_trips_through_frames(message, seq, max_payload):
    assert m.decode_message(message.TYPE, message.encode()) == message
    assert receive(wire(message, seq, max_payload)) == [message]


@settings(max_examples=150, deadline=None)
@given(st.lists(MESSAGES, min_size=1, max_size=6), st.data())
def test_stream_with_garbage_and_random_splits_recovers_every_frame(messages, data):
    stream = bytearray()
    for index, message in enumerate(messages):
        stream += data.draw(st.binary(max_size=40), label="garbage")
        stream += wire(message, seq=index * 50)
    stream += data.draw(st.binary(max_size=40), label="trailing garbage")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    decoder, reassembler, received = FrameDecoder(), m.Reassembler(), []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        for frame in decoder.feed(bytes(stream[start:stop])):
            try:
                message = reassembler.add(frame)
            except ProtocolError:
                continue
            if message is not None:
                received.append(message)
    assert received == messages


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(data):
    for attempt in (lambda: decode_frame(data), lambda: m.decode_message(data[0] if data else 1, data[1:])):
        try:
            attempt()
        except ProtocolError:
            pass
    decoder = FrameDecoder()
    decoder.feed(data)


def raw_frame(body: bytes) -> bytes:
    """COBS-encoded bytes of ``body`` + its CRC, without delimiters."""
    from cobs import cobs
    return cobs.encode(body + crc16(body).to_bytes(2, "little"))


def test_each_malformation_has_its_own_error():
    good = encode_frame(Frame(0x01, 7, b"\x01"))[1:-1]
    assert decode_frame(good) == Frame(0x01, 7, b"\x01")
    corrupted = bytearray(good)
    corrupted[3] ^= 0x10
    with pytest.raises(CrcError):
        decode_frame(bytes(corrupted))
    with pytest.raises(FramingError):
        decode_frame(b"\x09\x01\x02")
    with pytest.raises(TruncatedFrameError):
        decode_frame(raw_frame(b"\x01\x01"))
    with pytest.raises(BadLengthError, match="says 5 bytes"):
        decode_frame(raw_frame(bytes([VERSION, 1, 0, 0, 0, 5, 0, 1])))
    with pytest.raises(VersionError):
        decode_frame(raw_frame(bytes([VERSION + 1, 1, 0, 0, 0, 0, 0])))
    with pytest.raises(UnknownMessageError):
        m.decode_message(0x42, b"")
    with pytest.raises(PayloadError, match="Hello"):
        m.decode_message(0x01, b"\x01\x02")
    with pytest.raises(PayloadError, match="Map"):
        m.decode_message(0x83, m.Map(0, 0, 0, 2, 0, 2, np.zeros((2, 2), np.uint16)).encode()[:-1])
    with pytest.raises(BadLengthError):
        encode_frame(Frame(0x01, 0, bytes(MAX_PAYLOAD + 1)))


def test_decoder_drops_overlong_garbage_and_keeps_going():
    decoder = FrameDecoder()
    frame = encode_frame(Frame(0x09, 1))
    assert decoder.feed(b"\x55" * 5000 + frame) == [Frame(0x09, 1)]
    assert decoder.rejected == 1


def test_crc_is_ccitt_false():
    assert crc16(b"123456789") == 0x29B1


def test_vectors_file_and_codec_agree():
    vectors = json.loads(PATH.read_text())["vectors"]
    assert {v["name"] for v in vectors} == {name for name, _, _ in EXAMPLES}
    assert {v["type"] for v in vectors} == set(m.REGISTRY)  # every message type has a vector
    check(vectors)
    fragmented = next(v for v in vectors if v["name"] == "program_reference_fragmented")
    assert len(fragmented["frames_hex"]) == 2
