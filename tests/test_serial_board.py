"""The serial driver against the virtual board, over a real pseudo-terminal and a real socket."""

import json
import re
import subprocess
import sys

import pytest
import torch

from cim_hil.board import open_board
from cim_hil.cli import main
from cim_hil.config import LinkConfig
from cim_hil.emulator.board import build_emulator
from cim_hil.errors import BoardError, UnsafeValueError
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.training.optimizer import MixedPrecisionOptimizer
from drivers.link import BoardNotAnswering
from drivers.simulators.faults import FaultPlan
from drivers.simulators.firmware import BoardFirmware
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import messages as m
from firmware_protocol.framing import FLAG_MORE, Frame, decode_frame

from .conftest import make_config

SMALL = make_config(soc=dict(tiles=2, rows=32, cols=32), periphery=dict(transpose=True), seed=7)
QUICK = LinkConfig(response_timeout_s=0.05, retries=10)


@pytest.fixture
def served(serve):
    return serve(SMALL)


def _session_inputs(generator):
    return dict(
        targets=8 + 20 * torch.rand(32, 32, generator=generator),
        mask=torch.rand(32, 32, generator=generator) < 0.7,
        x=torch.rand(70, 32, generator=generator) * 2 - 1,
        sparse=torch.randint(-4, 5, (32, 32), generator=generator) * (torch.rand(32, 32, generator=generator) < 0.05),
        dense=torch.randint(-4, 5, (32, 32), generator=generator),
    )


def _session(board, inputs):
    """Every Tile operation once, in a fixed order; returns what each gave."""
    tile = board[1]
    return [
        tile.program_reference(torch.full((32, 32), 19.0)),
        tile.program_verify(inputs["targets"], inputs["mask"]),
        tile.forward(inputs["x"]),
        tile.backward(inputs["x"]),
        tile.forward(inputs["x"][:, :20], outputs=7),  # a layer smaller than the tile
        tile.backward(inputs["x"][:, :9], outputs=30),
        tile.read_conductances(),
        tile.read_conductances((3, 9, 0, 5)),
        tile.read_reference(),
        tile.apply_pulses(inputs["sparse"]),
        tile.apply_pulses(inputs["dense"]),
        tile.read_conductances(),
        # Both tiles at once: the in-process emulator batches them, the serial board sends them
        # one by one; each tile's numbers must not depend on that.
        board.group(list(board)).forward(inputs["x"][:, :20].expand(2, -1, -1), [7, 32]),
        board.group(list(board)).backward(inputs["x"].expand(2, -1, -1), [32, 5]),
        board.group(list(board)).program_verify(inputs["targets"].expand(2, -1, -1), inputs["mask"].expand(2, -1, -1)),
        board[0].read_conductances(),
    ]


def test_every_operation_gives_the_emulators_numbers(served):
    url, _ = served
    twin = build_emulator(SMALL)
    inputs = _session_inputs(torch.Generator().manual_seed(1))
    with open_board(url) as host:
        assert host.info()["tiles"] == 2
        for name, value in vars(twin[0].spec).items():  # floats travel as f32
            assert getattr(host[0].spec, name) == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value)
        for through_board, in_process in zip(_session(host, inputs), _session(twin, inputs), strict=True):
            if isinstance(through_board, torch.Tensor):
                assert torch.equal(through_board, in_process)
            else:
                assert torch.equal(through_board.reached_us.nan_to_num(-1), in_process.reached_us.nan_to_num(-1))
                assert torch.equal(through_board.trials, in_process.trials)
                assert torch.equal(through_board.failed, in_process.failed)
        counted, expected = host.counters.as_dict(), twin.counters.as_dict()
        assert counted.pop("link_bytes_in") > 0 and counted.pop("link_bytes_out") > 0
        assert counted == {key: value for key, value in expected.items() if not key.startswith("link_")}


def test_faulty_line_still_applies_every_pulse_exactly_once():
    plan = FaultPlan(drop_byte_rate=2e-4, flip_bit_rate=2e-4, stall_rate=0.1, stall_s=0.08, seed=3)
    board = VirtualBoard(SMALL, faults=plan)
    url = board.open_pty()
    board.start()
    twin = build_emulator(SMALL)
    generator = torch.Generator().manual_seed(2)
    requests = 0
    try:
        with open_board(url, QUICK) as host:
            for step in range(24):
                counts = torch.randint(-6, 7, (32, 32), generator=generator)
                if step % 2:
                    counts = counts * (torch.rand(32, 32, generator=generator) < 0.1)
                assert torch.equal(host[0].apply_pulses(counts), twin[0].apply_pulses(counts))
                requests += 1
            targets = 8 + 20 * torch.rand(32, 32, generator=generator)
            through_board, in_process = host[1].program_verify(targets), twin[1].program_verify(targets)
            assert torch.equal(through_board.trials, in_process.trials)
            stats = host.link.stats
    finally:
        board.stop()
    assert stats.retries > 0 and board.faults.bytes_dropped > 0 and board.faults.bits_flipped > 0 and board.faults.stalls > 0
    assert board.firmware.executed["PulsesDense"] + board.firmware.executed["PulsesSparse"] == requests
    assert board.firmware.executed["Program"] == 1
    for served_tile, twin_tile in zip(board.firmware.board, twin):
        assert torch.equal(served_tile.devices.g, twin_tile.devices.g)
    assert board.firmware.board[0].counters.pulses == twin[0].counters.pulses


def test_board_that_disappears_mid_step_leaves_the_host_state_intact():
    board = VirtualBoard(SMALL)
    url = board.open_tcp()
    board.start()
    host = open_board(url, QUICK)
    model = convert_to_analog(torch.nn.Sequential(torch.nn.Linear(20, 10)), host, MappingConfig())
    optimizer = MixedPrecisionOptimizer(model, lr=0.5, rule="adam")
    layer = model[0]

    def gradients():
        optimizer.zero_grad()
        model(torch.rand(4, 20)).square().sum().backward()

    def host_state():
        state = {(name, key): value.clone() if torch.is_tensor(value) else value
                 for name, p in model.named_parameters() for key, value in optimizer.state[p].items()}
        return state, [p.detach().clone() for p in model.parameters()], layer.levels.clone()

    gradients()
    optimizer.step()
    before = host_state()
    gradients()
    board.stop()  # the cable is pulled while the step programs the devices
    with pytest.raises(BoardError, match=url.replace(".", r"\.")):
        optimizer.step()
    state, params, levels = host_state()
    assert state.keys() == before[0].keys() and all(
        torch.equal(value, before[0][key]) if torch.is_tensor(value) else value == before[0][key]
        for key, value in state.items())
    assert all(torch.equal(p, old) for p, old in zip(params, before[1])) and torch.equal(levels, before[2])
    assert optimizer.steps == 1
    host.close()


def test_a_board_that_stops_answering_mid_transfer_is_named():
    board = VirtualBoard(SMALL, faults=FaultPlan(hang_up_after_answers=4))
    url = board.open_pty()
    board.start()
    with open_board(url, QUICK) as host:  # HELLO is answer 1
        with pytest.raises(BoardError, match=url):
            host[0].program_verify(torch.full((32, 32), 20.0))  # 32x32 f32 targets: 5 fragments
    board.stop()


def test_protocol_version_mismatch_is_refused_clearly():
    board = VirtualBoard(SMALL, protocol_version=2)  # a board with the previous firmware
    url = board.open_pty()
    board.start()
    with pytest.raises(BoardError, match="speaks protocol version 2.*this host speaks protocol version 3"):
        open_board(url, QUICK)
    board.stop()


def test_missing_port_silent_port_and_echoing_link_get_clear_errors(tmp_path):
    with pytest.raises(BoardError, match="cannot open serial port /dev/ttyNOSUCHPORT"):
        open_board("/dev/ttyNOSUCHPORT")
    silent = VirtualBoard(SMALL)  # a line nobody serves
    url = silent.open_pty()
    with pytest.raises(BoardNotAnswering, match=f"board on {url} did not answer HELLO"):
        open_board(url, LinkConfig(response_timeout_s=0.02, retries=2))
    with pytest.raises(BoardError, match="echoes"):
        open_board("loop://", QUICK)
    assert main(["board", "info", "/dev/ttyNOSUCHPORT"]) == 2


def test_board_refusals_arrive_as_clear_errors(served):
    url, _ = served
    with open_board(url) as host:
        request = m.PulsesDense(0, 0, torch.full((32, 32), 2000, dtype=torch.int16).numpy())
        with pytest.raises(UnsafeValueError, match="refused PULSES_DENSE: OUT_OF_RANGE"):
            host.link.request(request, m.PulsesApplied)
        with pytest.raises(UnsafeValueError, match="tile 5 does not exist"):
            host.link.request(m.ReadCounters(5), m.CountersReply)
        assert host[0].read_conductances().shape == (32, 32)  # the link carries on


def test_firmware_answers_a_repeated_seq_without_running_again():
    firmware = BoardFirmware(lambda: build_emulator(SMALL))
    pulses = m.PulsesSparse(0, *(torch.tensor([1, 2]).numpy().astype("u2"),) * 2, torch.tensor([3, -2]).numpy().astype("i2"))
    frame = Frame(m.PulsesSparse.TYPE, 9, pulses.encode())
    first, again = firmware.answer(frame), firmware.answer(frame)
    assert first == again and firmware.executed["PulsesSparse"] == 1
    assert firmware.board[0].counters.pulses == 5
    fragment = Frame(m.Program.TYPE, 10, b"\x00" * 4, FLAG_MORE)
    ack = decode_frame(firmware.answer(fragment)[1:-1])
    assert ack.type == m.Ack.TYPE and firmware.answer(fragment) == firmware.answer(fragment)
    nothing = decode_frame(firmware.answer(Frame(m.Next.TYPE, 11, m.Next(1).encode()))[1:-1])
    assert m.decode_message(nothing.type, nothing.payload).code == m.ErrorCode.NO_PENDING_REPLY


def test_cli_board_info_reads_a_virtual_board(served, capsys):
    url, _ = served
    assert main(["board", "info", url]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tiles"] == 2 and info["backend"] == "serial" and info["link"]["frames_in"] >= 1


def test_cli_board_serve_prints_where_to_connect():
    server = subprocess.Popen([sys.executable, "-m", "cim_hil.cli", "board", "serve", "--tcp", "0", "--tiles", "1"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"virtual board on (\S+)", line).group(1)
        with open_board(url) as host:
            assert host.info()["tiles"] == 1 and host[0].read_conductances().shape == (64, 64)
    finally:
        server.terminate()
        server.wait(timeout=10)
