"""The reference firmware checks what comes off the wire itself, before it touches a tile."""

import pytest

from cim_hil.emulator.board import build_emulator
from drivers.simulators.firmware import BoardFirmware
from firmware_protocol import messages as m
from firmware_protocol.framing import Frame, decode_frame

from .conftest import make_config

EIGHT_BY_EIGHT = make_config(soc=dict(tiles=1, rows=8, cols=8), seed=4)


@pytest.mark.parametrize("array", [0, 1])
@pytest.mark.parametrize("window", [(0, 9, 0, 8), (0, 8, 3, 3), (5, 2, 0, 8)])
def test_a_window_off_the_tile_is_refused_before_any_read(array, window):
    firmware = BoardFirmware(lambda: build_emulator(EIGHT_BY_EIGHT))
    answer = decode_frame(firmware.answer(Frame(m.ReadMap.TYPE, 3, m.ReadMap(0, array, *window).encode()))[1:-1])
    error = m.decode_message(answer.type, answer.payload)
    assert isinstance(error, m.Error) and error.code == m.ErrorCode.OUT_OF_RANGE
    assert f"window {window} does not fit a 8x8 tile" in error.text
    assert firmware.board[0].counters.device_reads == 0 and not firmware.executed


def test_a_window_on_the_tile_is_read():
    firmware = BoardFirmware(lambda: build_emulator(EIGHT_BY_EIGHT))
    answer = decode_frame(firmware.answer(Frame(m.ReadMap.TYPE, 3, m.ReadMap(0, 0, 2, 5, 1, 8).encode()))[1:-1])
    reply = m.decode_message(answer.type, answer.payload)
    assert isinstance(reply, m.Map) and reply.codes.shape == (3, 7)
    assert firmware.board[0].counters.device_reads > 0
