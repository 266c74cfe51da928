"""The reference firmware follows each rule of SPEC.md §1-§4 that a board implementer must
know: version handling, the fragment and pending-reply state machine, the kept answer, error
precedence and the one code for each case that could take several.

Frames go in as bytes and answers come out as bytes (``BoardFirmware.receive``); the version
and seq corners are also checked over a real pseudo-terminal.
"""

import json
import os
import select
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cim_hil.board import open_board
from cim_hil.config import LinkConfig
from cim_hil.emulator.board import build_emulator
from cim_hil.errors import UnsafeValueError
from drivers.simulators.firmware import BoardFirmware
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import messages as m
from firmware_protocol.framing import FLAG_MORE, MAX_PAYLOAD, VERSION, Frame, FrameDecoder, decode_frame, encode_frame

from .conftest import make_config

BOARD = make_config(soc=dict(tiles=4, rows=64, cols=64), seed=3)  # the geometry of the vectors' INFO
E = m.ErrorCode
VECTORS = Path(__file__).resolve().parent.parent / "firmware_protocol" / "vectors" / f"v{VERSION}.json"


@pytest.fixture
def firmware():
    return BoardFirmware(lambda: build_emulator(BOARD))


def ask(firmware, kind, seq, payload=b"", flags=0, version=VERSION) -> Frame:
    answers = firmware.receive(encode_frame(Frame(kind, seq, payload, flags, version)))
    assert len(answers) == 1, "every frame that reaches the board gets exactly one answer"
    answer = decode_frame(answers[0][1:-1], speaks=None)
    assert answer.seq == seq
    return answer


def request(firmware, kind, seq, payload) -> Frame:
    """A whole request, fragmented; the answer to its last fragment (every other one ACKed)."""
    pieces = [payload[i : i + MAX_PAYLOAD] for i in range(0, len(payload), MAX_PAYLOAD)] or [b""]
    for i, piece in enumerate(pieces[:-1]):
        assert ask(firmware, kind, seq + i, piece, FLAG_MORE).type == m.Ack.TYPE
    return ask(firmware, kind, seq + len(pieces) - 1, pieces[-1])


def refused(answer: Frame) -> int:
    assert answer.type == m.Error.TYPE, f"expected ERROR, got type {answer.type:#04x}"
    return m.Error.decode(answer.payload).code


def forward_payload(codes, outputs=4, code_bytes=1, flags=0, tile=0, batch=None):
    dtype = "<i1" if code_bytes == 1 else "<i2"
    body = np.asarray(codes, dtype=dtype).tobytes() if code_bytes in (1, 2) else bytes(len(codes) * len(codes[0]))
    return struct.pack("<BBBxHH", tile, flags, code_bytes, len(codes) if batch is None else batch, outputs) + body


def program_payload(targets, tolerance=0.0, trials=0, tile=0, array=0):
    targets = np.asarray(targets, dtype="<f4")
    return struct.pack("<BBHfHH", tile, array, trials, tolerance, *targets.shape) + targets.tobytes()


# ---- versions ------------------------------------------------------------------------------

def test_a_frame_of_another_version_gets_unsupported_version_in_its_own_version(firmware):
    answer = ask(firmware, m.Hello.TYPE, 40, bytes([1]), version=1)
    assert answer.version == 1 and refused(answer) == E.UNSUPPORTED_VERSION
    assert f"speaks protocol version {VERSION}" in m.Error.decode(answer.payload).text
    # Nothing was kept: the same seq and type in this version is a new request and runs.
    info = ask(firmware, m.Hello.TYPE, 40, bytes([VERSION]))
    assert info.type == m.Info.TYPE and info.version == VERSION


def test_a_v1_host_on_a_pty_reads_its_refusal():
    """What a host of the previous protocol sees: an answer in its own frame version."""
    board = VirtualBoard(BOARD)
    path = board.open_pty()
    board.start()
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"\x00" + encode_frame(Frame(m.Hello.TYPE, 1, bytes([1]), 0, 1)))
        decoder, frames, deadline = FrameDecoder(speaks=1), [], time.monotonic() + 10
        while not frames and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                frames = decoder.feed(os.read(fd, 4096))
    finally:
        os.close(fd)
        board.stop()
    assert [(f.version, f.type, f.seq) for f in frames] == [(1, m.Error.TYPE, 1)]
    assert m.Error.decode(frames[0].payload).code == E.UNSUPPORTED_VERSION


def test_hello_naming_another_version_is_refused(firmware):
    assert refused(ask(firmware, m.Hello.TYPE, 1, bytes([VERSION + 1]))) == E.UNSUPPORTED_VERSION


# ---- types -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [m.Info.TYPE, m.Ack.TYPE, m.Error.TYPE, m.Products.TYPE, 0x3F, 0x40])
def test_reply_types_and_unknown_types_are_unknown_message(firmware, kind):
    assert refused(ask(firmware, kind, 5, b"\x01")) == E.UNKNOWN_MESSAGE


def test_an_unknown_type_with_more_is_refused_at_its_first_fragment(firmware):
    assert refused(ask(firmware, 0x3E, 5, b"\x01" * 10, FLAG_MORE)) == E.UNKNOWN_MESSAGE


# ---- fragments and the pending reply ---------------------------------------------------------

def test_an_empty_fragment_with_more_is_bad_length_and_drops_the_partial_message(firmware):
    payload = program_payload(np.full((64, 64), 20.0))
    assert ask(firmware, m.Program.TYPE, 1, payload[:MAX_PAYLOAD], FLAG_MORE).type == m.Ack.TYPE
    assert refused(ask(firmware, m.Program.TYPE, 2, b"", FLAG_MORE)) == E.BAD_LENGTH
    # The next fragment starts a new message: alone, it is not a whole PROGRAM.
    assert refused(ask(firmware, m.Program.TYPE, 3, payload[MAX_PAYLOAD : 2 * MAX_PAYLOAD])) == E.BAD_LENGTH
    assert firmware.executed["Program"] == 0


def test_a_message_beyond_max_message_is_bad_length_at_the_fragment_that_passes_it(firmware):
    piece = b"\x01" * MAX_PAYLOAD
    full = m.MAX_MESSAGE // MAX_PAYLOAD
    for seq in range(1, full + 1):
        assert ask(firmware, m.Forward.TYPE, seq, piece, FLAG_MORE).type == m.Ack.TYPE
    assert refused(ask(firmware, m.Forward.TYPE, full + 1, b"\x01", FLAG_MORE)) == E.BAD_LENGTH
    assert firmware.executed["Forward"] == 0


def test_next_between_request_fragments_drops_the_partial_request(firmware):
    payload = program_payload(np.full((64, 64), 20.0))
    assert ask(firmware, m.Program.TYPE, 1, payload[:MAX_PAYLOAD], FLAG_MORE).type == m.Ack.TYPE
    assert refused(ask(firmware, m.Next.TYPE, 2, m.Next(1).encode())) == E.NO_PENDING_REPLY
    assert refused(ask(firmware, m.Program.TYPE, 3, payload[MAX_PAYLOAD : 2 * MAX_PAYLOAD])) == E.BAD_LENGTH


def _read_whole_tile(firmware, seq) -> Frame:
    first = ask(firmware, m.ReadMap.TYPE, seq, m.ReadMap(0, 0, 0, 64, 0, 64).encode())
    assert first.type == m.Map.TYPE and first.more  # 8 KB of codes: several pieces
    return first


def test_any_request_abandons_the_pending_pieces(firmware):
    _read_whole_tile(firmware, 1)
    assert ask(firmware, m.ReadCounters.TYPE, 2, b"\x00").type == m.CountersReply.TYPE
    assert refused(ask(firmware, m.Next.TYPE, 3, m.Next(1).encode())) == E.NO_PENDING_REPLY


def test_next_for_no_such_piece_or_with_more_is_refused_and_keeps_the_pending_pieces(firmware):
    _read_whole_tile(firmware, 1)  # 6 + 8192 bytes: pieces 0..8
    assert refused(ask(firmware, m.Next.TYPE, 2, m.Next(0).encode())) == E.NO_PENDING_REPLY
    assert refused(ask(firmware, m.Next.TYPE, 3, m.Next(9).encode())) == E.NO_PENDING_REPLY
    assert refused(ask(firmware, m.Next.TYPE, 4, m.Next(1).encode(), FLAG_MORE)) == E.BAD_LENGTH
    last = ask(firmware, m.Next.TYPE, 5, m.Next(8).encode())
    assert last.type == m.Map.TYPE and not last.more


def test_next_with_a_payload_is_bad_length_and_keeps_the_pending_pieces(firmware):
    first = _read_whole_tile(firmware, 1)
    assert refused(ask(firmware, m.Next.TYPE, 2, b"\x00")) == E.BAD_LENGTH
    pieces = [first.payload]
    seq = 3
    while True:
        piece = ask(firmware, m.Next.TYPE, seq, m.Next(seq - 2).encode())
        assert piece.type == m.Map.TYPE
        pieces.append(piece.payload)
        seq += 1
        if not piece.more:
            break
    assert m.Map.decode(b"".join(pieces)).codes.shape == (64, 64)


# ---- the kept answer ----------------------------------------------------------------------------

def _pulse(firmware, seq):
    payload = m.PulsesSparse(0, np.array([1], "u2"), np.array([2], "u2"), np.array([3], "i2")).encode()
    return ask(firmware, m.PulsesSparse.TYPE, seq, payload)


def test_only_the_last_answer_is_kept(firmware):
    first = _pulse(firmware, 7)
    assert _pulse(firmware, 7).payload == first.payload and firmware.executed["PulsesSparse"] == 1
    ask(firmware, m.ReadCounters.TYPE, 8, b"\x00")
    _pulse(firmware, 7)  # older than the last answer: a new request, it runs again
    assert firmware.executed["PulsesSparse"] == 2
    assert firmware.board[0].counters.pulses == 6


def test_hello_and_reset_answers_are_kept_like_any_other(firmware):
    _pulse(firmware, 1)
    assert ask(firmware, m.Reset.TYPE, 2, b"\x01").type == m.Ack.TYPE
    assert ask(firmware, m.Reset.TYPE, 2, b"\x01").type == m.Ack.TYPE  # a retried RESET: kept answer
    assert firmware.executed["Reset"] == 1
    assert ask(firmware, m.Hello.TYPE, 3, bytes([VERSION])).type == m.Info.TYPE
    assert ask(firmware, m.Hello.TYPE, 3, bytes([VERSION])).type == m.Info.TYPE
    assert firmware.executed["Hello"] == 1


# ---- error precedence and one code per case -----------------------------------------------------

def test_bad_length_precedes_unsupported_precedes_out_of_range():
    plain = BoardFirmware(lambda: build_emulator(make_config(periphery=dict(transpose=False))))
    transpose_on_missing_tile = forward_payload([[1, 2]], outputs=2, flags=1, tile=9)
    assert refused(ask(plain, m.Forward.TYPE, 1, transpose_on_missing_tile)) == E.UNSUPPORTED
    bad_layout = forward_payload([[1, 2]], outputs=2, flags=1, tile=9, code_bytes=3)
    assert refused(ask(plain, m.Forward.TYPE, 2, bad_layout)) == E.BAD_LENGTH
    assert refused(ask(plain, m.Forward.TYPE, 3, forward_payload([[1, 2]], outputs=2, tile=9))) == E.OUT_OF_RANGE


CASES = {
    "dense shape beyond the tile": (m.PulsesDense.TYPE, m.PulsesDense(0, 0, np.zeros((65, 64), "i2")).encode(),
                                    E.OUT_OF_RANGE),
    "duplicate device in sparse pulses": (
        m.PulsesSparse.TYPE, m.PulsesSparse(0, np.array([1, 1], "u2"), np.array([2, 2], "u2"),
                                            np.array([1, 1], "i2")).encode(), E.OUT_OF_RANGE),
    "batch 0": (m.Forward.TYPE, forward_payload([[1, 2]], batch=0), E.BAD_LENGTH),
    "width 0": (m.Forward.TYPE, forward_payload([[]]), E.OUT_OF_RANGE),
    "code_bytes 3": (m.Forward.TYPE, forward_payload([[1, 2]], code_bytes=3), E.BAD_LENGTH),
    "code beyond the DAC": (m.Forward.TYPE, forward_payload([[1, 200]], code_bytes=2), E.OUT_OF_RANGE),
    "NaN tolerance": (m.Program.TYPE, program_payload([[20.0]], tolerance=float("nan")), E.OUT_OF_RANGE),
    "negative tolerance": (m.Program.TYPE, program_payload([[20.0]], tolerance=-1.0), E.OUT_OF_RANGE),
    "infinite tolerance": (m.Program.TYPE, program_payload([[20.0]], tolerance=float("inf")), E.OUT_OF_RANGE),
    "infinite target": (m.Program.TYPE, program_payload([[float("inf")]]), E.OUT_OF_RANGE),
    "target below g_min": (m.Program.TYPE, program_payload([[1.0]]), E.OUT_OF_RANGE),
    "program block beyond the tile": (m.Program.TYPE, program_payload(np.full((1, 65), 20.0)), E.OUT_OF_RANGE),
    "program of no device": (m.Program.TYPE, program_payload(np.zeros((0, 64))), E.OUT_OF_RANGE),
    "array 2": (m.ReadMap.TYPE, m.ReadMap(0, 2, 0, 1, 0, 1).encode(), E.OUT_OF_RANGE),
    "HELLO with two bytes": (m.Hello.TYPE, bytes([VERSION, 0]), E.BAD_LENGTH),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_ambiguous_case_has_one_code_and_changes_nothing(firmware, case):
    kind, payload, code = CASES[case]
    before = firmware.board[0].devices.g.clone()
    assert refused(request(firmware, kind, 1, payload)) == code
    assert torch.equal(firmware.board[0].devices.g, before)


def test_code_bytes_describes_the_codes_it_does_not_have_to_match_the_dac():
    answers = []
    for code_bytes in (1, 2):
        firmware = BoardFirmware(lambda: build_emulator(BOARD))
        answers.append(ask(firmware, m.Forward.TYPE, 1, forward_payload([[1, -2, 3]], code_bytes=code_bytes)))
    assert answers[0].type == m.Products.TYPE and answers[0].payload == answers[1].payload


# ---- the vectors are requests a board of the vectors' INFO accepts -------------------------------

REPLY = {m.Hello.TYPE: m.Info.TYPE, m.Forward.TYPE: m.Products.TYPE, m.ReadMap.TYPE: m.Map.TYPE,
         m.PulsesSparse.TYPE: m.PulsesApplied.TYPE, m.PulsesDense.TYPE: m.PulsesApplied.TYPE,
         m.Program.TYPE: m.ProgramReport.TYPE, m.ReadCounters.TYPE: m.CountersReply.TYPE, m.Reset.TYPE: m.Ack.TYPE,
         m.ProgramDevices.TYPE: m.DevicesReport.TYPE, m.LayerForward.TYPE: m.LayerProducts.TYPE,
         m.SetAdcRange.TYPE: m.AdcRange.TYPE}


def test_every_request_vector_is_accepted_by_the_reference_board():
    """On a board of the INFO vector's geometry with a 16-bit DAC (the transpose vector sends
    16-bit codes) and transpose products."""
    config = make_config(soc=dict(tiles=4, rows=64, cols=64), periphery=dict(transpose=True, input_bits=16))
    firmware = BoardFirmware(lambda: build_emulator(config))
    for vector in json.loads(VECTORS.read_text())["vectors"]:
        if not m.is_request(vector["type"]) or vector["type"] == m.Next.TYPE:
            continue
        answers = [decode_frame(firmware.receive(bytes.fromhex(h))[0][1:-1]) for h in vector["frames_hex"]]
        assert all(a.type == m.Ack.TYPE for a in answers[:-1]), vector["name"]
        last = answers[-1]
        assert last.type == REPLY[vector["type"]], (vector["name"], last.payload)
        if vector["type"] == m.Program.TYPE:  # the report has the request's shape (a top-left block)
            payload = last.payload
            seq, piece = last.seq, 0
            while last.more:
                seq, piece = seq + 1, piece + 1
                ask_next = Frame(m.Next.TYPE, seq, m.Next(piece).encode())
                last = decode_frame(firmware.receive(encode_frame(ask_next))[0][1:-1])
                payload += last.payload
            report = m.ProgramReport.decode(payload)
            assert list(report.reached_us.shape) == vector["fields"]["targets"]["shape"]


# ---- the host's side of the seq corners, over a real pty -----------------------------------------

def test_an_error_answering_seq_0_is_an_answer_not_a_bad_crc_notice():
    board = VirtualBoard(BOARD)
    url = board.open_pty()
    board.start()
    try:
        with open_board(url, LinkConfig(response_timeout_s=0.5, retries=2)) as host:
            host.link._seq = 0xFFFF  # the next request goes out with seq 0
            with pytest.raises(UnsafeValueError, match="tile 9 does not exist"):
                host.link.request(m.ReadCounters(9), m.CountersReply)
            assert host.link.stats.retries == 0
    finally:
        board.stop()
