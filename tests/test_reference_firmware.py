"""The reference firmware checks what comes off the wire itself, before it touches a tile, and
tells the host its tiles' specs in INFO."""

import dataclasses

import numpy as np
import pytest

from cim_hil.emulator.board import build_emulator
from cim_hil.tile import Capability
from drivers.board_info import capabilities_from_bits, capability_bits, spec_from_info
from drivers.simulators.firmware import BoardFirmware
from firmware_protocol import messages as m
from firmware_protocol.framing import VERSION, Frame, decode_frame

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


def test_hello_tells_the_host_the_emulators_spec_field_by_field():
    firmware = BoardFirmware(lambda: build_emulator(make_config(soc=dict(tiles=2, rows=8, cols=16), seed=4,
                                                                periphery=dict(transpose=True))))
    answer = decode_frame(firmware.answer(Frame(m.Hello.TYPE, 1, m.Hello(VERSION).encode()))[1:-1])
    info = m.decode_message(answer.type, answer.payload)
    told, true = dataclasses.asdict(spec_from_info(info)), dataclasses.asdict(firmware.board[0].spec)
    assert info.tiles == 2 and told.keys() == true.keys()
    for name, value in true.items():
        # INFO carries reals as float32; everything else arrives exactly.
        assert told[name] == (float(np.float32(value)) if isinstance(value, float) else value), name
    assert Capability.TRANSPOSE in told["capabilities"]


def test_capability_bits_carry_every_capability_a_board_can_have():
    board_side = set(Capability) - {Capability.COMPUTED_PRODUCTS}  # a host-side way of working
    assert capabilities_from_bits(capability_bits(Capability)) == board_side
    assert capability_bits([Capability.PULSES, Capability.REFERENCE]) == m.CapabilityBit.pulses | m.CapabilityBit.reference
