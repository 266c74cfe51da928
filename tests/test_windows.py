"""Windows on the wire (firmware_protocol/SPEC.md §8.5): the host's exact requests on a real
pty, bad windows refused by the host before anything is sent and by the board with
OUT_OF_RANGE, and a packed model on a virtual board giving the emulator's numbers with fewer
bytes than the padding it replaces."""

import json
import os
import select
import threading
import tty
from pathlib import Path

import numpy as np
import pytest
import torch

from cim_hil.board import open_board
from cim_hil.config import LinkConfig
from cim_hil.emulator import build_emulator
from cim_hil.errors import ShapeError
from cim_hil.layer_products import LayerCut, layer_products
from cim_hil.nn import MappingConfig, analog_layers, convert_to_analog
from cim_hil.nn.placement import plan_placement
from cim_hil.training import MixedPrecisionOptimizer
from drivers.simulators.firmware import BoardFirmware
from firmware_protocol import messages as m
from firmware_protocol.framing import Frame, decode_frame, encode_frame

from .conftest import make_config

VECTORS = json.loads((Path(__file__).resolve().parent.parent / "firmware_protocol" / "vectors" / "v3.json").read_text())
# The INFO vector's board (4 tiles of 64x64, 8-bit converters, forward LSB 0.25 uA).
INFO = m.Info(3, 0, 3, 0, 4, 64, 64, 8, 8, 16, 31, 100_000_000, 7.5, 31.25, 0.125, 0.25, 0.25, 0.125, 1024, 1000,
              0.75, 20)
WINDOWED_INFO = m.Info(**{**vars(INFO), "capabilities": INFO.capabilities | m.WINDOWS_BIT})


def _vector_payload(name: str) -> bytes:
    return bytes.fromhex(next(v for v in VECTORS["vectors"] if v["name"] == name)["payload_hex"])


class ScriptedBoard:
    """The board's end of a real pty that answers from a script, as PyMeasure's
    expected_protocol does: HELLO gets ``info``, each later request the next reply of
    ``replies``; every request frame is kept in ``heard`` to compare with what was expected."""

    def __init__(self, info: m.Info, replies: list[m.Message]) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.info, self.replies, self.heard = info, list(replies), []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        pending = b""
        while not self._stop.is_set():
            if not select.select([self.master], [], [], 0.02)[0]:
                continue
            pending += os.read(self.master, 65536)
            *chunks, pending = pending.split(b"\x00")
            for chunk in filter(None, chunks):
                frame = decode_frame(chunk)
                self.heard.append(frame)
                reply = self.info if frame.type == m.Hello.TYPE else self.replies.pop(0)
                os.write(self.master, encode_frame(Frame(reply.TYPE, frame.seq, reply.encode())))

    def requests(self) -> list[tuple[int, bytes]]:
        """(type, payload) of every request after the HELLO, in the order sent."""
        return [(frame.type, frame.payload) for frame in self.heard if frame.type != m.Hello.TYPE]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def scripted():
    boards = []

    def start(info, replies):
        boards.append(ScriptedBoard(info, replies))
        return boards[-1]

    yield start
    for board in boards:
        board.close()


def _fractions(codes) -> torch.Tensor:
    """Inputs whose DAC codes are ``codes`` (8 bits: code / 127)."""
    return torch.tensor(codes, dtype=torch.float32) / 127


LAYER_CODES = np.concatenate([np.zeros((2, 40), np.int16),
                              np.arange(-60, 28, 2, dtype=np.int16).reshape(1, 44).repeat(2, 0)], axis=1)


def test_windowed_products_go_on_the_wire_as_the_spec_writes_them(scripted):
    line = scripted(WINDOWED_INFO, [
        m.Products(1, False, np.array([[5, -5], [0, 127]], np.int8)),
        m.Products(1, True, np.array([[1, 2, 3]], np.int8)),
        m.LayerProducts(3, np.arange(20, dtype=np.int16).reshape(2, 10)),
    ])
    with open_board(line.path, LinkConfig(response_timeout_s=0.5)) as host:
        forward = host[1].forward(_fractions([[1, -2, 3], [127, -127, 0]]), 2, origin=(25, 6))
        backward = host[1].backward(_fractions([[-5, 0, 5, 9]]), 3, origin=(25, 6))
        layer = layer_products(host.group([host[0], host[1]]), LayerCut(84, 10, 2, 1), torch.from_numpy(LAYER_CODES),
                               origins=[(0, 16), (6, 54)])
    assert line.requests() == [
        # SPEC.md §8.5's worked example, byte for byte.
        (m.Forward.TYPE, bytes.fromhex("01 02 01 00 02 00 02 00 19 00 06 00 01 fe 03 7f 81 00")),
        # The transpose: flags transpose | WINDOW, columns 6..9 driven, rows 25..27 converted.
        (m.Forward.TYPE, bytes.fromhex("01 03 01 00 01 00 03 00 19 00 06 00 fb 00 05 09")),
        # One LAYER_FORWARD with each block's (tile, row, col): the golden vector's bytes.
        (m.LayerForward.TYPE, _vector_payload("layer_forward_windows")),
    ]
    assert torch.equal(forward, torch.tensor([[5.0, -5.0], [0.0, 127.0]]) * 0.25)
    assert torch.equal(backward, torch.tensor([[1.0, 2.0, 3.0]]) * 0.25)
    assert torch.equal(layer, torch.arange(20.0).view(2, 10) * 0.25)


def test_a_board_without_windows_is_sent_the_padding_as_before(scripted):
    padded = np.zeros((1, 8), np.int8)
    padded[0, 6:] = [5, -5]
    line = scripted(INFO, [m.Products(1, False, padded)])
    with open_board(line.path, LinkConfig(response_timeout_s=0.5)) as host:
        out = host[1].forward(_fractions([[1, -2, 3]]), 2, origin=(25, 6))
    # No WINDOW flag: 25 zeros before the codes, and outputs 0..7 asked for; the first 6 dropped.
    assert line.requests() == [(m.Forward.TYPE, bytes.fromhex("01 00 01 00 01 00 08 00") + bytes(25) + bytes.fromhex("01 fe 03"))]
    assert torch.equal(out, torch.tensor([[5.0, -5.0]]) * 0.25)


def test_bad_windows_are_refused_by_the_host_before_anything_is_sent(scripted):
    line = scripted(WINDOWED_INFO, [])
    with open_board(line.path, LinkConfig(response_timeout_s=0.5)) as host:
        x = _fractions([[1, -2, 3]])
        with pytest.raises(ShapeError, match=r"origin \(64, 0\) lies outside the 64x64 tile"):
            host[1].forward(x, 2, origin=(64, 0))
        with pytest.raises(ShapeError, match=r"at origin \(62, 6\) must have shape \(batch, k\) with 1 <= k <= 2"):
            host[1].forward(x, 2, origin=(62, 6))  # rows 62, 63, 64: past the edge
        with pytest.raises(ShapeError, match=r"outputs from column 62 \(origin \(25, 62\)\) must be between 1 and 2, got 3"):
            host[1].forward(x, 3, origin=(25, 62))
        with pytest.raises(ShapeError, match=r"block 1 \(20x10\) at origin \(6, 60\) passes the edge of the 64x64 tile"):
            layer_products(host.group([host[0], host[1]]), LayerCut(84, 10, 2, 1), torch.from_numpy(LAYER_CODES),
                           origins=[(0, 16), (6, 60)])
    assert line.requests() == []


BOARD = make_config(soc=dict(tiles=4, rows=64, cols=64), periphery=dict(transpose=True), seed=7)


def _answer(firmware: BoardFirmware, message: m.Message) -> m.Message:
    (frame,) = m.fragments(message, 40)
    answer = decode_frame(firmware.answer(frame)[1:-1])
    return m.decode_message(answer.type, answer.payload)


@pytest.mark.parametrize("request_, refusal", [
    (m.Forward(1, False, np.ones((1, 3), np.int8), 2, (64, 0)), "window origin (64, 0) lies outside the 64x64 tile"),
    (m.Forward(1, False, np.ones((1, 3), np.int8), 2, (62, 6)), "width 3 from row 62 passes the edge"),
    (m.Forward(1, False, np.ones((1, 3), np.int8), 3, (25, 62)), "3 outputs from column 62 pass the edge"),
    (m.Forward(1, True, np.ones((1, 3), np.int8), 2, (0, 62)), "width 3 from column 62 passes the edge"),
    (m.Forward(1, True, np.ones((1, 3), np.int8), 3, (62, 0)), "3 outputs from row 62 pass the edge"),
    (m.Forward(1, False, np.full((1, 3), 127, np.int8), 2, (64, 0)), "window origin"),  # the window before the codes
    (m.LayerForward(4, 3, 2, 1, 84, 10, np.array([0, 1], np.uint16), None, LAYER_CODES,
                    np.array([[0, 16], [6, 60]], np.uint16)), "block 1 (20x10) at origin (6, 60) passes the edge"),
])
def test_bad_windows_are_refused_by_the_board_with_out_of_range(request_, refusal):
    firmware = BoardFirmware(lambda: build_emulator(BOARD))
    before = [tile.devices.g.clone() for tile in firmware.board]
    answer = _answer(firmware, request_)
    assert isinstance(answer, m.Error) and answer.code == m.ErrorCode.OUT_OF_RANGE and refusal in answer.text
    assert all(tile.counters.products == tile.counters.transpose_products == 0 for tile in firmware.board)
    assert all(torch.equal(tile.devices.g, g) for tile, g in zip(firmware.board, before))


def test_a_layer_forward_windows_byte_other_than_0_or_1_is_bad_length():
    payload = bytearray(m.LayerForward(4, 3, 1, 1, 3, 2, np.array([0], np.uint16), None,
                                       np.ones((1, 3), np.int16)).encode())
    payload[11] = 2
    firmware = BoardFirmware(lambda: build_emulator(BOARD))
    answer = decode_frame(firmware.answer(Frame(m.LayerForward.TYPE, 41, bytes(payload)))[1:-1])
    error = m.Error.decode(answer.payload)
    assert error.code == m.ErrorCode.BAD_LENGTH and "windows flag 2" in error.text


PACKED = make_config(soc=dict(tiles=2, rows=32, cols=32), periphery=dict(transpose=True), seed=5)


def _packed_training(board) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three Adam steps of a convolution and two Linears packed onto two 32x32 tiles (blocks at
    column offsets), analog backward: the outputs of each step and the final weights."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 6 * 6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5))
    placement = plan_placement(model, 32, 32, tiles=2)
    assert placement.tiles_used == 2 and sum(1 for b in placement.blocks if b.col) >= 4
    analog = convert_to_analog(model, board, MappingConfig(backward="analog"), placement)
    optimizer = MixedPrecisionOptimizer(analog, lr=0.05, rule="adam")
    generator, outputs = torch.Generator().manual_seed(1), []
    for _ in range(3):
        out = analog(torch.rand(8, 1, 8, 8, generator=generator))
        outputs.append(out.detach())
        out.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return outputs, [layer.weight.detach().clone() for layer in analog_layers(analog)]


def test_a_packed_model_on_a_virtual_board_gives_the_emulators_numbers_with_fewer_bytes(serve):
    emulated = build_emulator(PACKED)
    outputs, weights = _packed_training(emulated)
    link_bytes = {}
    for windows in (True, False):
        url, board = serve(PACKED, windows=windows)
        with open_board(url) as host:
            board_outputs, board_weights = _packed_training(host)
            link_bytes[windows] = host.link.stats.bytes_out + host.link.stats.bytes_in
        assert all(torch.equal(a, b) for a, b in zip(board_weights, weights))
        assert all(torch.equal(a.devices.g, b.devices.g) and torch.equal(a.references.g, b.references.g)
                   for a, b in zip(board.firmware.board, emulated))
        # Without windows the board computes the emulator's own sums, to the bit; with them it
        # sums its row blocks' ADC codes digitally (SPEC.md §8.3), equal to float rounding.
        for a, b in zip(board_outputs, outputs):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6) if windows else torch.equal(a, b)
        # With windows each layer's forward is one LAYER_FORWARD (3 layers x 3 steps); without,
        # packed layers go as a padded FORWARD per block.
        assert (board.firmware.executed["LayerForward"] == 9) == windows
    assert link_bytes[True] < link_bytes[False]  # (programming, the same both ways, is most of it here)
