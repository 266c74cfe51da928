"""Conductance relaxation: time let pass on a board moves its devices as the model says."""

import math

import pytest
import torch

from cim_hil.board import open_board
from cim_hil.emulator.board import build_emulator
from cim_hil.emulator.relaxation import decades
from cim_hil.errors import CapabilityError, UnsafeValueError
from drivers.simulators.virtual_board import VirtualBoard

from .conftest import make_config

DAY = 86400.0


def programmed(seed: int = 3, **device):
    """A board of two 64x64 tiles, tile 0's weight devices written to 26 uS (above the relaxed
    19.45 uS, three of a day's spreads below the upper bound)."""
    board = build_emulator(make_config(soc=dict(tiles=2, rows=64, cols=64), seed=seed, device=device))
    board[0].program_verify(torch.full((64, 64), 26.0))
    return board


def test_the_mean_drifts_and_the_spread_grows_with_log_time():
    board = programmed()
    device = board[0].config.device
    spacing, target = device.level_spacing_us, board.store.g_min + device.relaxation_target * (
        board.store.g_max - board.store.g_min)
    start, reads = board.store.g[0, 0].clone(), board[0].read_conductances()
    last_std, waited = 0.0, 0.0
    for when in (1.0, 3600.0, DAY):
        board.let_time_pass(when - waited)
        waited = when
        step = math.log10(1 + when / device.relaxation_tau_s)
        moved = board.store.g[0, 0] - start
        expected = (target[0, 0] - start) * (1 - math.exp(-device.relaxation_drift * step))
        spread = device.relaxation_spread_levels * spacing * math.sqrt(step)
        assert float((moved - expected).mean()) == pytest.approx(0, abs=4 * spread / 64)
        assert float((moved - expected).std()) == pytest.approx(spread, rel=0.05)
        assert float((moved - expected).std()) > last_std
        last_std = float((moved - expected).std())
    # The reads (noisy, converted) see the drift: 4096 devices average their read noise away.
    drift = float((target[0, 0] - start).mean()) * (1 - math.exp(-device.relaxation_drift * math.log10(1 + DAY)))
    assert float((board[0].read_conductances() - reads).mean()) == pytest.approx(drift, abs=0.05)
    assert drift < -0.5


def test_a_wait_is_exactly_the_model_drawn_from_each_tiles_stream():
    board = programmed()
    device = board[0].config.device
    store = board.store
    board.let_time_pass(10.0)
    before, streams = store.g.clone(), [tile.generator.get_state() for tile in board]
    board.let_time_pass(3590.0)
    normal = []
    for tile, state in zip(board, streams):
        generator = torch.Generator().manual_seed(0)
        generator.set_state(state)
        normal.append(torch.randn((2, 64, 64), generator=generator))
    step = decades(torch.tensor(3600.0), device.relaxation_tau_s) - decades(torch.tensor(10.0), device.relaxation_tau_s)
    target = store.g_min + device.relaxation_target * (store.g_max - store.g_min)
    expected = (target + (before - target) * torch.exp(-device.relaxation_drift * step)
                + device.relaxation_spread_levels * device.level_spacing_us * step.sqrt() * torch.stack(normal))
    assert torch.allclose(store.g, expected.clamp(store.g_min, store.g_max), atol=1e-5)
    assert store.clock_s == 3600.0


def test_a_seed_gives_the_same_chip_after_any_wait_and_seeds_differ():
    one, same, other = programmed(3), programmed(3), programmed(4)
    for board in (one, same, other):
        board.let_time_pass(3600.0)
    assert torch.equal(one.store.g, same.store.g)
    assert not torch.equal(one.store.g, other.store.g)


def test_a_rewritten_device_starts_its_age_again():
    board = programmed(relaxation_spread_levels=0.0)
    board.let_time_pass(DAY)
    board[0].program_verify(torch.full((64, 64), 26.0), mask=(torch.arange(64)[:, None] < 32).expand(64, 64))  # rows 0-31 again
    written = board.store.g[0, 0].clone()
    board.let_time_pass(1.0)
    moved = (board.store.g[0, 0] - written).abs()
    # Rows 0-31 take their first second's step (L 0 -> 0.30); the others a day's last second
    # (L + 5e-6: under a float32 step of their conductance).
    assert float(moved[:32].mean()) > 0.02 and float(moved[32:].max()) < 1e-5


def test_nothing_changes_with_the_model_off():
    off = dict(relaxation_drift=0.0, relaxation_spread_levels=0.0)
    waited, not_waited = programmed(**off), programmed(**off)
    conductances = waited.store.g.clone()
    waited.let_time_pass(DAY)
    assert torch.equal(waited.store.g, conductances)
    assert torch.equal(waited[0].read_conductances(), not_waited[0].read_conductances())  # no stream drawn from


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf, True, "1h", None])
def test_a_bad_duration_is_refused_and_changes_nothing(seconds):
    board = programmed()
    conductances, stream = board.store.g.clone(), board[0].generator.get_state()
    with pytest.raises(UnsafeValueError, match="seconds"):
        board.let_time_pass(seconds)
    assert torch.equal(board.store.g, conductances) and board.store.clock_s == 0.0
    assert torch.equal(board[0].generator.get_state(), stream)


def test_a_board_without_a_wait_refuses_clearly():
    served = VirtualBoard(make_config(soc=dict(tiles=1, rows=16, cols=16)))
    url = served.open_tcp()
    served.start()
    try:
        with open_board(url) as board:
            assert not board.can_let_time_pass
            with pytest.raises(CapabilityError, match="cannot let time pass"):
                board.let_time_pass(1.0)
    finally:
        served.stop()
    assert open_board("emulator:?tiles=1").can_let_time_pass


def test_a_composite_board_waits_on_every_member_or_none():
    with open_board("composite:emulator:?tiles=1&rows=16&cols=16|emulator:?tiles=1&rows=16&cols=16&first_tile=1") as both:
        assert both.can_let_time_pass
        both.let_time_pass(60.0)
        assert [member.store.clock_s for member in both.members] == [60.0, 60.0]
    served = VirtualBoard(make_config(soc=dict(tiles=1, rows=16, cols=16)))
    url = served.open_tcp()
    served.start()
    try:
        with open_board(f"composite:emulator:?tiles=1&rows=16&cols=16|{url}") as mixed:
            assert not mixed.can_let_time_pass
            with pytest.raises(CapabilityError, match="member 1 .*cannot let time pass"):
                mixed.let_time_pass(1.0)
            assert mixed.members[0].store.clock_s == 0.0
    finally:
        served.stop()
