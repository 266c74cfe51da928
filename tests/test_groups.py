"""Groups of tiles: the emulator's batched group against the plain tile-by-tile loop, bit for bit."""

import gc
import weakref
from dataclasses import replace

import pytest
import torch

from cim_hil.emulator import build_emulator
from cim_hil.emulator.group import EmulatedGroup
from cim_hil.errors import BoardError, CapabilityError, ShapeError, UnsafeValueError
from cim_hil.group import TileGroup
from tests.conftest import IDEAL, make_config

SMALL = dict(soc=dict(tiles=4, rows=16, cols=16), periphery=dict(transpose=True))


def assert_same_boards(one, other):
    for name in ("g", "g_min", "g_max", "a_up", "a_down", "stuck"):
        assert torch.equal(getattr(one[0].store, name), getattr(other[0].store, name)), name
    for a, b in zip(one, other):
        # Energy is a float sum, and its order follows the calls (the loop adds each array's writes alone).
        assert replace(a.counters, energy_nj=0) == replace(b.counters, energy_nj=0)
        assert a.counters.energy_nj == pytest.approx(b.counters.energy_nj, rel=1e-12)
        assert torch.equal(a.generator.get_state(), b.generator.get_state())


def assert_same_results(one, other):
    for name in ("reached_us", "trials", "failed"):  # exactly, NaN where nothing was asked
        torch.testing.assert_close(getattr(one, name), getattr(other, name), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("picked", [[0, 1, 2, 3], [1, 2], [3, 0, 2]], ids=["board", "run", "out of order"])
def test_the_emulators_batched_group_gives_the_plain_loops_numbers(picked):
    config = make_config(**SMALL)
    plain_board, batched_board = build_emulator(config), build_emulator(config)
    plain = TileGroup([plain_board[i] for i in picked], plain_board)
    batched = batched_board.group([batched_board[i] for i in picked])
    assert type(plain) is TileGroup and type(batched) is EmulatedGroup
    n, generator = len(picked), torch.Generator().manual_seed(7)

    def both(call):
        results = call(plain), call(batched)
        assert_same_boards(plain_board, batched_board)
        return results

    targets = 8 + 20 * torch.rand(n, 16, 16, generator=generator)
    mask = torch.rand(n, 16, 16, generator=generator) < 0.3
    assert_same_results(*both(lambda group: group.program_reference(targets, mask)))
    assert_same_results(*both(lambda group: group.program_verify(targets)))
    # Named devices out of order, weight and reference devices mixed.
    places = torch.randperm(n * 256, generator=generator)[: 40 * n]
    reference = torch.rand(len(places), generator=generator) < 0.5
    named = 8 + 20 * torch.rand(len(places), generator=generator)
    assert_same_results(*both(lambda group: group.program_places(places, named, reference)))
    x = torch.rand(n, 5, 16, generator=generator) * 2 - 1
    outputs = [16, 9, 3, 12][:n]
    for _ in range(2):  # the second time from what the group keeps
        assert torch.equal(*both(lambda group: group.forward(x, outputs)))
        assert torch.equal(*both(lambda group: group.backward(x[:, :, :7], outputs)))
        assert torch.equal(*both(lambda group: group.forward(x[:, :, :11])))
    # Changes made outside the group (pulses on one tile, a direct write, a loaded state) show at once.
    pulses = torch.randint(-3, 4, (16, 16), generator=generator)
    both(lambda group: group.tiles[-1].apply_pulses(pulses))
    assert torch.equal(*both(lambda group: group.forward(x, outputs)))
    both(lambda group: group.tiles[0].devices.g.__setitem__((2, 3), 27.5))
    assert torch.equal(*both(lambda group: group.backward(x, outputs)))
    state = plain_board[picked[0]].state_dict()
    state["devices"]["g_max"].fill_(20.0)
    state["references"]["g"].fill_(12.0)
    both(lambda group: group.tiles[-1].load_state_dict(state))
    assert torch.equal(*both(lambda group: group.forward(x, outputs)))
    assert_same_results(*both(lambda group: group.program_places(places, named, reference)))
    assert torch.equal(*both(lambda group: group.forward(x, outputs)))


def test_a_write_that_skips_every_setter_is_seen_by_the_next_product():
    board = build_emulator(make_config(soc=dict(tiles=2, rows=16, cols=16), **IDEAL))
    group = board.group(list(board))
    x = torch.rand(2, 4, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def expected():
        weights = torch.stack([tile.devices.g - tile.references.g for tile in board])
        return board[0].spec.v_read * torch.bmm(x, weights)

    assert torch.allclose(group.forward(x), expected(), atol=1e-4)
    board[1].devices.g[4, 5] = 30.0  # an in-place write of the conductance tensor itself
    assert torch.allclose(group.forward(x), expected(), atol=1e-4)
    board[0].store.g.view(-1)[17] = 25.0  # the whole store, flat: tile 0's device (1, 1)
    board[0].references.g.add_(0.5)
    assert torch.allclose(group.forward(x), expected(), atol=1e-4)
    assert torch.allclose(board[0].forward(x[0]), expected()[0], atol=1e-4)  # the tile alone too


def test_a_write_on_one_board_leaves_what_another_board_keeps():
    first, second = (build_emulator(make_config(soc=dict(tiles=2, rows=8, cols=8))) for _ in range(2))
    version = second[0].store.version
    first[0].program_verify(torch.full((8, 8), 20.0))
    first[1].apply_pulses(torch.ones(8, 8, dtype=torch.int64))
    assert second[0].store.version == version and first[0].store.version != version


def test_named_devices_on_several_tiles_program_as_the_same_writes_by_mask():
    config = make_config(soc=dict(tiles=3, rows=16, cols=16))
    by_name, by_mask = build_emulator(config), build_emulator(config)
    generator = torch.Generator().manual_seed(5)
    targets = 8 + 20 * torch.rand(3, 16, 16, generator=generator)
    mask = torch.rand(3, 16, 16, generator=generator) < 0.3
    chosen = mask.flatten().nonzero().squeeze(1)
    # Given out of order, weight and reference devices mixed: the tiles still draw as a loop would.
    shuffled = chosen[torch.randperm(len(chosen), generator=generator)]
    places = torch.cat([shuffled, shuffled])
    reference = torch.arange(len(places)) >= len(shuffled)
    result = by_name.group(list(by_name)).program_places(places, targets.flatten()[places], reference)
    masked = by_mask.group(list(by_mask))
    weights = masked.program_verify(targets, mask)
    references = masked.program_reference(targets, mask)
    assert_same_boards(by_name, by_mask)
    # One entry per device named, in the order named.
    assert torch.equal(result.reached_us, torch.cat([weights.reached_us.flatten()[shuffled],
                                                     references.reached_us.flatten()[shuffled]]))
    assert torch.equal(result.trials, torch.cat([weights.trials.flatten()[shuffled], references.trials.flatten()[shuffled]]))


def test_bad_groups_and_bad_device_writes_are_refused_before_any_device_moves():
    board = build_emulator(make_config(soc=dict(tiles=2, rows=8, cols=8)))
    group = board.group(list(board))
    before = board[0].store.g.clone()
    with pytest.raises(ShapeError, match="more than once"):
        group.program_places(torch.tensor([3, 3]), torch.tensor([20.0, 21.0]))
    with pytest.raises(ShapeError, match=r"\[0, 128\)"):
        group.program_places(torch.tensor([3, 128]), torch.tensor([20.0, 21.0]))
    with pytest.raises(UnsafeValueError, match="outside the safe"):
        group.program_places(torch.tensor([3, 70]), torch.tensor([20.0, 90.0]))
    with pytest.raises(ShapeError, match=r"\(2, batch, k\)"):
        group.forward(torch.zeros(1, 4, 8))
    with pytest.raises(UnsafeValueError, match="NaN"):
        group.forward(torch.full((2, 4, 8), float("nan")))
    with pytest.raises(CapabilityError, match="transpose"):
        group.backward(torch.zeros(2, 4, 8))
    assert torch.equal(board[0].store.g, before) and board[0].counters.cycles == 0
    without = build_emulator(make_config(soc=dict(tiles=1), periphery=dict(reference_devices=False)))
    with pytest.raises(CapabilityError, match="reference"):
        without.group(list(without)).program_places(torch.tensor([3]), torch.tensor([20.0]), reference=True)
    other = build_emulator(make_config(soc=dict(tiles=1, rows=8, cols=8)))
    with pytest.raises(BoardError, match="tiles of the board"):
        board.group([board[0], other[0]])
    twice = board.group([board[0], board[0]])  # packed blocks of one tile: products only
    with pytest.raises(ShapeError, match="products only"):
        twice.program_verify(torch.full((2, 8, 8), 20.0))
    with pytest.raises(ShapeError, match="one emulated board"):
        EmulatedGroup([board[0], other[0]])


def test_loaded_device_state_bounds_the_next_writes():
    board = build_emulator(make_config(soc=dict(tiles=1), device=dict(programming_error_levels=0.0)))
    group, tile = board.group(list(board)), board[0]
    group.program_places(torch.tensor([0]), torch.tensor([30.0]))
    state = tile.state_dict()
    state["devices"]["g_max"] = torch.full_like(state["devices"]["g_max"], 25.0)
    tile.load_state_dict(state)
    group.program_places(torch.tensor([1]), torch.tensor([30.0]))
    assert float(tile.devices.g.flatten()[1]) <= 25.0


def test_a_dropped_board_is_freed_after_products_and_writes():
    # What a group keeps (plans, matrices) is the group's, so a sweep that opens board after
    # board does not pile up.
    kept = []
    for _ in range(3):
        board = build_emulator(make_config(soc=dict(tiles=3, rows=8, cols=8)))
        group = board.group(list(board))
        group.forward(torch.rand(3, 4, 8), [5, 5, 5])
        group.program_places(torch.tensor([1, 70, 150]), torch.tensor([20.0, 21.0, 22.0]))
        kept.append(weakref.ref(board[0]))
        del board, group
    gc.collect()
    assert all(ref() is None for ref in kept)
