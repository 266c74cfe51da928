"""Threads sharing one transport: each request (and each instrument operation) is one
transaction, so two threads get exactly the numbers each gets alone."""

import threading

import pytest
import torch

from cim_hil.board import open_board
from cim_hil.config import LinkConfig
from cim_hil.errors import UnsafeValueError
from drivers.instrument_board import InstrumentBoardConfig
from drivers.simulators.scpi_simulator import SimulatedProbeStation
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import messages as m

from .conftest import make_config

BOARD = make_config(soc=dict(tiles=2, rows=16, cols=16), seed=11)
ROUNDS = 25


def _work(tile, seed: int) -> list[torch.Tensor]:
    """Pulses, products and reads on one tile; every call's result."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for _ in range(ROUNDS):
        counts = torch.randint(-3, 4, (16, 16), generator=generator)
        x = torch.rand(5, 16, generator=generator) * 2 - 1
        results += [tile.apply_pulses(counts), tile.forward(x), tile.read_conductances((0, 4, 0, 16))]
    return results


def _run_threads(targets) -> list:
    results, errors = [None] * len(targets), []

    def run(index, target):
        try:
            results[index] = target()
        except BaseException as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def _served():
    board = VirtualBoard(BOARD)
    url = board.open_tcp()
    board.start()
    return board, url


def test_two_threads_on_one_socket_board_each_get_the_single_threaded_numbers():
    alone = []
    server, url = _served()
    try:
        with open_board(url) as board:
            for index in range(2):
                alone.append(_work(board[index], seed=index))
    finally:
        server.stop()
    server, url = _served()
    try:
        with open_board(url) as board:
            together = _run_threads([lambda i=i: _work(board[i], seed=i) for i in range(2)])
            pulses = [board[i].counters.pulses for i in range(2)]
            retries = board.link.stats.retries
        executed = server.firmware.executed
    finally:
        server.stop()
    for index in range(2):
        assert all(torch.equal(a, b) for a, b in zip(alone[index], together[index], strict=True))
        asked = sum(int(result.abs().sum()) for result in alone[index][0::3])
        assert pulses[index] == asked  # no request ran twice
    assert retries == 0
    assert executed["PulsesDense"] + executed["PulsesSparse"] == 2 * ROUNDS


def test_a_refusal_on_seq_0_is_read_as_a_refusal_not_a_bad_crc():
    server, url = _served()
    try:
        with open_board(url, LinkConfig(response_timeout_s=0.2, retries=2)) as board:
            board.link._seq = 0xFFFF  # the next request's seq wraps to 0 (1 in 65,536 of them)
            with pytest.raises(UnsafeValueError, match="tile 9 does not exist"):
                board.link.request(m.ReadCounters(9), m.CountersReply)
            assert board.link.stats.retries == 0
    finally:
        server.stop()


def test_two_threads_on_one_instrument_board_each_get_the_single_threaded_numbers():
    array = make_config(soc=dict(tiles=1, rows=4, cols=4), periphery=dict(cols_per_adc=4), seed=5,
                        device=dict(read_noise_levels=0.0))
    with SimulatedProbeStation(array) as station:
        config = InstrumentBoardConfig(matrix_resource=station.matrix.server.resource_name, timeout_ms=2000)
        with open_board(station.smu.server.resource_name, config) as board:
            tile = board[0]
            alone = [tile.read_conductances((0, 2, 0, 4)), tile.read_conductances((2, 4, 0, 4))]
            together = _run_threads([lambda w=w: [tile.read_conductances(w) for _ in range(4)]
                                     for w in [(0, 2, 0, 4), (2, 4, 0, 4)]])
    for expected, reads in zip(alone, together, strict=True):
        assert all(torch.equal(expected, read) for read in reads)
