"""Protocol v3's commands against the virtual board over a real pty and a real socket: whole
layers (with the board cutting a convolution's patches) and named-device write-verify give
the in-process emulator's numbers bit for bit, survive a damaged line, and go on the wire in
the order a training step asks for them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cim_hil.board import open_board
from cim_hil.config import LinkConfig
from cim_hil.emulator.board import build_emulator
from cim_hil.errors import UnsafeValueError
from cim_hil.layer_products import Convolution, LayerCut, layer_products, unroll
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.training.optimizer import MixedPrecisionOptimizer
from drivers.simulators.faults import FaultPlan
from drivers.simulators.firmware import BoardFirmware
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import messages as m
from firmware_protocol.framing import Frame, decode_frame

from .conftest import make_config

TILES = make_config(soc=dict(tiles=6, rows=16, cols=16), seed=11)
QUICK = LinkConfig(response_timeout_s=0.05, retries=20)


@pytest.fixture
def served(serve):
    return serve(TILES)


def _codes(generator, *shape, zeros=0.5):
    codes = torch.randint(-127, 128, shape, generator=generator).float()
    return codes * (torch.rand(shape, generator=generator) >= zeros)  # runs of zeros, as after a ReLU


CONVOLUTION = Convolution(3, 9, 8, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))  # 18 inputs: 2 row blocks


def _session(board, generator):
    """Each v3 operation once, in a fixed order; what each gave."""
    tiles = list(board)
    images = _codes(generator, 5, 3, 9, 8)
    devices = torch.randperm(6 * 256, generator=generator)[:300]
    levels = torch.randint(0, 16, (300,), generator=generator)
    spec = tiles[0].spec
    results = [
        board.group(tiles).program_places(devices, spec.level_conductance(levels), torch.arange(300) % 3 == 0),
        board.group(tiles[2:4]).program_places(torch.randperm(512, generator=generator)[:40],
                                               8 + 20 * torch.rand(40, generator=generator)),  # targets in uS, between levels
        # A 20-in 24-out layer on tiles 0..3 (2 x 2 blocks); a convolution with every geometry
        # field set, channels first and channels last.
        layer_products(board.group(tiles[:4]), LayerCut(20, 24, 2, 2), _codes(generator, 70, 20)),
        layer_products(board.group(tiles[4:6]), LayerCut(18, 5, 2, 1), images, CONVOLUTION),
        layer_products(board.group(tiles[4:6]), LayerCut(18, 5, 2, 1), images.contiguous(memory_format=torch.channels_last),
                       CONVOLUTION),
        layer_products(board.group(tiles[3:4]), LayerCut(12, 16, 1, 1), _codes(generator, 4, 1, 4, 4),
                       Convolution(1, 4, 4, (3, 4), padding=(1, 0))),
    ]
    return results + [tile.read_conductances() for tile in tiles] + [tile.read_reference() for tile in tiles]


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return all(torch.equal(x.nan_to_num(-1), y.nan_to_num(-1)) for x, y in
               ((a.reached_us, b.reached_us), (a.trials, b.trials), (a.failed, b.failed)))


def test_every_v3_command_gives_the_emulators_numbers(served):
    url, board = served
    twin = build_emulator(TILES)
    in_process = _session(twin, torch.Generator().manual_seed(3))
    with open_board(url) as host:
        through_board = _session(host, torch.Generator().manual_seed(3))
        counted = {k: v for k, v in host.counters.as_dict().items() if not k.startswith("link_")}
    assert all(_same(a, b) for a, b in zip(through_board, in_process, strict=True))
    assert counted == {k: v for k, v in twin.counters.as_dict().items() if not k.startswith("link_")}
    assert board.firmware.executed["ProgramDevices"] == 2 and board.firmware.executed["LayerForward"] == 4
    assert board.firmware.executed["Program"] == board.firmware.executed["Forward"] == 0


def test_board_cut_and_host_cut_patches_give_the_same_numbers():
    """The same seed, the same images: the board cutting the patches (LAYER_FORWARD with a
    geometry) and the host cutting them (the patch matrix as a plain layer's inputs)."""
    images = _codes(torch.Generator().manual_seed(4), 6, 3, 9, 8)
    patches = unroll(images, CONVOLUTION)
    cut = LayerCut(18, 5, 2, 1)
    results = []
    for board_cuts in (True, False):
        with VirtualBoard(TILES) as served:
            url = served.open_pty()
            served.start()
            with open_board(url) as host:
                tiles = list(host)[4:6]
                if board_cuts:
                    results.append(layer_products(host.group(tiles), cut, images, CONVOLUTION))
                else:
                    results.append(layer_products(host.group(tiles), cut, patches))
    emulated = build_emulator(TILES)
    results.append(layer_products(emulated.group(list(emulated)[4:6]), cut, images, CONVOLUTION))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert results[0].shape == (6 * 5 * 10, 5) and results[0].abs().sum() > 0


def test_host_cut_patches_are_those_of_torch():
    images = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(5))
    kernel = torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(6))
    expected = F.conv2d(images, kernel, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    for by_column in (True, False):
        rows = unroll(images, CONVOLUTION, by_column) @ kernel.permute(0, 2, 3, 1).reshape(4, -1).T
        torch.testing.assert_close(rows.view(2, 5, 10, 4).permute(0, 3, 1, 2), expected)


def _model():
    torch.manual_seed(8)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 10))


def _train(board, steps, generator):
    """A few training steps; the model, the losses and how many steps programmed devices."""
    model = convert_to_analog(_model(), board, MappingConfig(differential=True))
    optimizer = MixedPrecisionOptimizer(model, lr=0.05, rule="adam")
    losses, programming_steps = [], 0
    for _ in range(steps):
        x, y = torch.rand(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        programming_steps += optimizer.last_step["devices_programmed"] > 0
    return model, losses, programming_steps


def test_training_over_a_damaged_line_applies_every_device_exactly_once():
    plan = FaultPlan(drop_byte_rate=1e-4, flip_bit_rate=1e-4, stall_rate=0.05, stall_s=0.06, seed=5)
    board = VirtualBoard(TILES, faults=plan)
    url = board.open_pty()
    board.start()
    try:
        with open_board(url, QUICK) as host:
            _, losses, programming_steps = _train(host, 6, torch.Generator().manual_seed(9))
            stats = host.link.stats
    finally:
        board.stop()
    twin = build_emulator(TILES)
    _, twin_losses, _ = _train(twin, 6, torch.Generator().manual_seed(9))
    assert losses == twin_losses and programming_steps >= 4
    assert stats.retries > 0 and board.faults.bytes_dropped > 0 and board.faults.bits_flipped > 0
    # One PROGRAM_DEVICES per layer's initial write and per step that programs, each run once.
    assert board.firmware.executed["ProgramDevices"] == 2 + programming_steps
    for served_tile, twin_tile in zip(board.firmware.board, twin):
        assert torch.equal(served_tile.devices.g, twin_tile.devices.g)
        assert torch.equal(served_tile.references.g, twin_tile.references.g)
        assert served_tile.counters.verify_trials == twin_tile.counters.verify_trials


class _Recording(BoardFirmware):
    """The firmware, keeping every request frame it is handed."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.heard: list[Frame] = []

    def answer(self, frame: Frame):
        if not frame.type & 0x80:
            self.heard.append(frame)
        return super().answer(frame)


def test_a_training_step_sends_one_request_per_layer_and_one_for_its_programming():
    board = VirtualBoard(TILES)
    board.firmware = _Recording(board.firmware.make_board)
    url = board.open_pty()
    board.start()
    try:
        with open_board(url) as host:
            model, _, _ = _train(host, 0, torch.Generator())
            heard_before = len(board.firmware.heard)
            optimizer = MixedPrecisionOptimizer(model, lr=0.5, rule="sgd")
            model(torch.rand(64, 1, 8, 8)).square().sum().backward()
            optimizer.step()
    finally:
        board.stop()
    frames = board.firmware.heard[heard_before:]
    order = []  # one [type, pieces asked for with NEXT] per request message
    fragment_open = False
    for frame in frames:
        if frame.type == m.Next.TYPE:
            order[-1][1].append(m.Next.decode(frame.payload).piece)
        elif not fragment_open:
            order.append([frame.type, []])
        fragment_open = frame.type != m.Next.TYPE and frame.more
    types = [kind for kind, _ in order]
    assert types == [m.LayerForward.TYPE, m.LayerForward.TYPE, m.ProgramDevices.TYPE]
    # The convolution's reply (64 images x 36 patches x 3 codes) comes back in pieces 1.. in order.
    pieces = order[0][1]
    assert pieces == list(range(1, len(pieces) + 1)) and len(pieces) >= 6
    last_fragment = next(index for index, frame in enumerate(frames) if not frame.more)
    first = m.decode_message(frames[0].type, b"".join(frame.payload for frame in frames[: last_fragment + 1]))
    assert first.geometry == m.Geometry(0, 1, 8, 8, (3, 3), (1, 1), (0, 0), (1, 1)) and first.codes.shape == (64, 64)


def test_refused_v3_requests_name_the_problem_and_change_nothing(served):
    url, board = served
    with open_board(url) as host:
        before = [tile.devices.g.clone() for tile in board.firmware.board]
        one = np.array([0], np.uint16)
        with pytest.raises(UnsafeValueError, match="level is beyond the board's 16 levels"):
            host.link.request(m.ProgramDevices(0, 0.0, one, one.astype(np.uint8), one, np.array([16], np.uint8)),
                              m.DevicesReport)
        with pytest.raises(UnsafeValueError, match="named more than once"):
            host.link.request(m.ProgramDevices(0, 0.0, np.array([1, 1], np.uint16), np.zeros(2, np.uint8),
                                               np.array([5, 5], np.uint16), np.array([3, 4], np.uint8)), m.DevicesReport)
        with pytest.raises(UnsafeValueError, match="tile 9 does not exist"):
            host.link.request(m.ProgramDevices(0, 0.0, np.array([9], np.uint16), np.zeros(1, np.uint8), one,
                                               np.array([3], np.uint8)), m.DevicesReport)
        with pytest.raises(UnsafeValueError, match="do not fit output format I8"):
            host.link.request(m.LayerForward(1, 1, 2, 1, 20, 4, np.array([0, 1], np.uint16), None,
                                             np.zeros((1, 20), np.int16)), m.LayerProducts)
        with pytest.raises(UnsafeValueError, match="not cut into 2x1 blocks"):
            host.link.request(m.LayerForward(1, 3, 2, 1, 12, 4, np.array([0, 1], np.uint16), None,
                                             np.zeros((1, 12), np.int16)), m.LayerProducts)
        with pytest.raises(UnsafeValueError, match="does not fit"):
            host.link.request(m.LayerForward(1, 3, 1, 1, 9, 4, np.array([0], np.uint16),
                                             m.Geometry(0, 1, 2, 2, (3, 3), (1, 1), (0, 0), (1, 1)),
                                             np.zeros((1, 4), np.int16)), m.LayerProducts)
        assert all(torch.equal(tile.devices.g, old) for tile, old in zip(board.firmware.board, before))
        assert board.firmware.executed["ProgramDevices"] == board.firmware.executed["LayerForward"] == 0


def test_next_names_its_piece_so_asking_again_runs_nothing():
    firmware = BoardFirmware(lambda: build_emulator(TILES))
    request = m.LayerForward(4, 3, 1, 1, 16, 16, np.array([0], np.uint16), None, np.ones((300, 16), np.int16))
    answers = [decode_frame(firmware.answer(frame)[1:-1]) for frame in m.fragments(request, 100)]
    assert answers[-1].more and firmware.executed["LayerForward"] == 1

    def piece(seq, number):
        return decode_frame(firmware.answer(Frame(m.Next.TYPE, seq, m.Next(number).encode()))[1:-1])

    third, first, third_again, last = piece(200, 3), piece(201, 1), piece(202, 3), piece(203, 4)
    assert third.payload == third_again.payload != first.payload and third.more and not last.more
    beyond = piece(204, 5)
    assert m.decode_message(beyond.type, beyond.payload).code == m.ErrorCode.NO_PENDING_REPLY
    whole = b"".join([answers[-1].payload] + [piece(300 + n, n).payload for n in range(1, 5)])
    assert m.decode_message(m.LayerProducts.TYPE, whole).codes.shape == (300, 16)
    assert firmware.executed["LayerForward"] == 1


def test_more_devices_than_one_message_holds_go_in_parts_of_whole_arrays(served, monkeypatch):
    url, board = served
    monkeypatch.setattr(m, "MAX_MESSAGE", 2048)  # 341 devices with u8 levels per request
    twin = build_emulator(TILES)
    generator = torch.Generator().manual_seed(12)
    devices = torch.randperm(6 * 256, generator=generator)[:1000]
    reference = torch.rand(1000, generator=generator) < 0.5
    with open_board(url) as host:
        levels = torch.randint(0, 16, (1000,), generator=generator)
        through_board = host.group(list(host)).program_places(devices, host[0].spec.level_conductance(levels), reference)
    in_process = twin.group(list(twin)).program_places(devices, twin[0].spec.level_conductance(levels), reference)
    assert _same(through_board, in_process) and board.firmware.executed["ProgramDevices"] >= 3
    for served_tile, twin_tile in zip(board.firmware.board, twin):
        assert torch.equal(served_tile.devices.g, twin_tile.devices.g)
        assert torch.equal(served_tile.references.g, twin_tile.references.g)
