"""Setting a tile's ADC full scale (``Tile.set_adc_range``, SPEC.md §8.6): the emulator, the
reference firmware's checks, and the serial driver over a real socket, which must give the
emulator's numbers and put exactly one SET_ADC_RANGE per call on the wire."""

import math
import struct

import numpy as np
import pytest
import torch

from cim_hil.board import open_board
from cim_hil.emulator.board import build_emulator
from cim_hil.errors import CapabilityError, UnsafeValueError
from cim_hil.layer_products import LayerCut, layer_products
from cim_hil.tile import Capability
from drivers.simulators.firmware import BoardFirmware
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import messages as m

from .conftest import make_config
from .test_firmware_rules import ask, refused

SMALL = make_config(soc=dict(tiles=3, rows=16, cols=16), periphery=dict(transpose=True), seed=5)
E = m.ErrorCode


def _programmed(board):
    generator = torch.Generator().manual_seed(2)
    for tile in board:
        tile.program_verify(8 + 23 * torch.rand(16, 16, generator=generator))
    return board


def test_a_smaller_full_scale_gives_finer_codes_and_saturates_beyond_it():
    board = _programmed(build_emulator(make_config(soc=dict(tiles=1, rows=16, cols=16),
                                                   device=dict(read_noise_levels=0.0), periphery=dict(adc_noise_levels=0.0))))
    tile = board[0]
    x = torch.rand(64, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    default = tile.forward(x)
    power_on_lsb = tile.forward_adc.lsb
    largest = float(default.abs().max())
    lsb = tile.set_adc_range(largest / 2)
    assert lsb == pytest.approx(largest / 2 / 127, rel=1e-6) and lsb < power_on_lsb
    narrow = tile.forward(x)
    assert float(narrow.abs().max()) == pytest.approx(127 * lsb, rel=1e-6)  # saturated at +-top_out
    inside = default.abs() < largest / 3
    assert (narrow - default)[inside].abs().max() <= (lsb + power_on_lsb) / 2 + 1e-6  # finer, same currents
    assert tile.set_adc_range(None) == np.float32(power_on_lsb)
    assert torch.equal(tile.forward(x), default)


def test_a_tiles_state_keeps_its_adc_ranges():
    board, again = _programmed(build_emulator(SMALL)), build_emulator(SMALL)
    board[0].set_adc_range(2.0)
    board[0].set_adc_range(3.0, transpose=True)
    again.load_state_dict(board.state_dict())
    x = torch.rand(8, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    assert torch.equal(again[0].forward(x), board[0].forward(x))
    assert torch.equal(again[0].backward(x), board[0].backward(x))
    older = {key: value for key, value in board.state_dict()["tiles"][0].items() if key != "adc_full_scales_ua"}
    again[0].load_state_dict(older)
    assert again[0].forward_adc.full_scale == again[0].power_on_adc(False).full_scale


def test_bad_full_scales_are_refused_and_change_nothing():
    tile = build_emulator(SMALL)[0]
    before = tile.forward_adc
    for value, message in [(0.0, "positive and finite"), (-1.0, "positive and finite"), (math.nan, "positive"),
                           (math.inf, "positive"), ("big", "must be a number"), (True, "must be a number"),
                           (1e6, "outside what this tile can set")]:
        with pytest.raises(UnsafeValueError, match=message):
            tile.set_adc_range(value)
    assert tile.forward_adc is before
    fixed = build_emulator(make_config(periphery=dict(adc_range_settable=False)))[0]
    assert not fixed.spec.supports(Capability.ADC_RANGE)
    with pytest.raises(CapabilityError, match="adc_range"):
        fixed.set_adc_range(5.0)


def test_a_group_of_tiles_with_different_ranges_gives_each_tiles_own_numbers():
    """The batched group falls back to one tile at a time; the numbers are those of lone tiles."""
    x = torch.rand(3, 20, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    batched, alone = _programmed(build_emulator(SMALL)), _programmed(build_emulator(SMALL))
    for board in (batched, alone):
        board[1].set_adc_range(3.0)
        board[2].set_adc_range(1.5, transpose=True)
    together = batched.group(list(batched)).forward(x)
    assert torch.equal(together, torch.stack([tile.forward(entry) for tile, entry in zip(alone, x)]))
    transposed = batched.group(list(batched)).backward(x)
    assert torch.equal(transposed, torch.stack([tile.backward(entry) for tile, entry in zip(alone, x)]))


# ---- the reference firmware ---------------------------------------------------------------

@pytest.fixture
def firmware():
    return BoardFirmware(lambda: build_emulator(SMALL))


def _payload(tile=0, direction=0, full_scale=2.0) -> bytes:
    return struct.pack("<HBxf", tile, direction, full_scale)


@pytest.mark.parametrize("payload, code", [
    (_payload()[:7], E.BAD_LENGTH),
    (_payload(tile=7, direction=5, full_scale=-1.0), E.OUT_OF_RANGE),  # the tile is named first
    (_payload(direction=2), E.OUT_OF_RANGE),
    (_payload(full_scale=math.nan), E.OUT_OF_RANGE),
    (_payload(full_scale=-2.0), E.OUT_OF_RANGE),
    (_payload(full_scale=1e9), E.OUT_OF_RANGE),
])
def test_the_firmware_checks_set_adc_range_in_the_order_of_the_spec(firmware, payload, code):
    before = [tile.forward_adc for tile in firmware.board]
    answer = ask(firmware, m.SetAdcRange.TYPE, 1, payload)
    assert refused(answer) == code
    assert [tile.forward_adc for tile in firmware.board] == before


def test_unsupported_precedes_out_of_range_and_reset_restores_the_power_on_range(firmware):
    fixed = BoardFirmware(lambda: build_emulator(make_config(periphery=dict(adc_range_settable=False))))
    assert refused(ask(fixed, m.SetAdcRange.TYPE, 1, _payload(tile=9, full_scale=-1.0))) == E.UNSUPPORTED
    no_transpose = BoardFirmware(lambda: build_emulator(make_config()))
    assert refused(ask(no_transpose, m.SetAdcRange.TYPE, 1, _payload(direction=1))) == E.UNSUPPORTED
    answer = m.AdcRange.decode(ask(firmware, m.SetAdcRange.TYPE, 2, _payload(tile=2, full_scale=2.0)).payload)
    assert (answer.tile, answer.direction) == (2, 0) and answer.lsb_ua == np.float32(2.0 / 127)
    assert ask(firmware, m.Reset.TYPE, 3, bytes([1])).type == m.Ack.TYPE
    again = m.AdcRange.decode(ask(firmware, m.SetAdcRange.TYPE, 4, _payload(tile=2, full_scale=0.0)).payload)
    info = m.Info.decode(ask(firmware, m.Hello.TYPE, 5, bytes([3])).payload)
    assert again.lsb_ua == info.forward_lsb_ua == np.float32(firmware.board[2].forward_adc.lsb)


def test_layer_forward_refuses_tiles_of_different_ranges(firmware):
    firmware.board[1].set_adc_range(2.0)
    request = m.LayerForward(1, 3, 2, 1, 20, 4, np.array([0, 1], np.uint16), None, np.zeros((1, 20), np.int16))
    answer = ask(firmware, m.LayerForward.TYPE, 1, request.encode())
    assert refused(answer) == E.OUT_OF_RANGE and b"different ADC ranges" in m.Error.decode(answer.payload).text.encode()


# ---- the serial driver --------------------------------------------------------------------

class _Heard(BoardFirmware):
    """The reference firmware, keeping every request frame it is sent."""

    def __init__(self, make_board):
        super().__init__(make_board)
        self.heard = []

    def answer(self, frame):
        if not frame.type & 0x80:
            self.heard.append(frame)
        return super().answer(frame)


@pytest.fixture
def served():
    board = VirtualBoard(SMALL)
    board.firmware = _Heard(board.firmware.make_board)
    url = board.open_tcp()
    board.start()
    yield url, board
    board.stop()


def test_a_serial_board_sets_ranges_with_one_request_each_and_gives_the_emulators_numbers(served):
    url, served_board = served
    twin = _programmed(build_emulator(SMALL))
    x = torch.rand(40, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    codes = torch.randint(-127, 128, (30, 20), generator=torch.Generator().manual_seed(7)).float()
    with open_board(url) as host:
        _programmed(host)
        assert host[0].spec.supports(Capability.ADC_RANGE)
        heard = len(served_board.firmware.heard)
        lsbs = [board[1].set_adc_range(2.5) for board in (host, twin)]
        lsbs += [board[2].set_adc_range(1.25, transpose=True) for board in (host, twin)]
        # (NEXTs the host sent ahead for the programming's report may still arrive; they run nothing.)
        frames = [f for f in served_board.firmware.heard[heard:] if f.type != m.Next.TYPE]
        assert [(f.type, f.seq - frames[0].seq, f.payload) for f in frames] == [
            (0x0C, 0, bytes.fromhex("0100 00 00") + struct.pack("<f", 2.5)),
            (0x0C, 1, bytes.fromhex("0200 01 00") + struct.pack("<f", 1.25)),
        ]
        assert lsbs == [np.float32(2.5 / 127)] * 2 + [np.float32(1.25 / 127)] * 2
        for board in (host, twin):
            board[0].set_adc_range(2.5)  # tiles 0 and 1 share a range: one LAYER_FORWARD
        results = [[board[1].forward(x), board[2].backward(x), board.group(list(board)).forward(x.expand(3, -1, -1)),
                    layer_products(board.group(list(board)[:2]), LayerCut(20, 4, 2, 1), codes),
                    layer_products(board.group(list(board)[1:]), LayerCut(20, 4, 2, 1), codes)]
                   for board in (host, twin)]
        for over_the_line, local in zip(*results):
            assert torch.equal(over_the_line, local)
        kinds = [f.type for f in served_board.firmware.heard[heard:]]
        # Tiles 1 and 2 convert with different LSBs: their layer goes as one FORWARD per tile.
        assert kinds.count(m.LayerForward.TYPE) == 1 and m.Forward.TYPE in kinds


def test_a_serial_board_without_the_capability_is_refused_before_anything_is_sent():
    board = VirtualBoard(make_config(soc=dict(tiles=1, rows=16, cols=16), periphery=dict(adc_range_settable=False)))
    board.firmware = _Heard(board.firmware.make_board)
    url = board.open_tcp()
    board.start()
    try:
        with open_board(url) as host:
            heard = len(board.firmware.heard)
            with pytest.raises(CapabilityError, match="does not support 'adc_range'"):
                host[0].set_adc_range(2.0)
            assert len(board.firmware.heard) == heard
    finally:
        board.stop()
