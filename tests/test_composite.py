"""Composite boards: a virtual board on a real socket plus emulated tiles, as one board."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from cim_hil.board import open_board
from cim_hil.config import LinkConfig
from cim_hil.errors import BoardError
from cim_hil.nn import MappingConfig, analog_layers, convert_to_analog
from cim_hil.nn.placement import plan_placement
from cim_hil.training import MixedPrecisionOptimizer
from drivers.simulators.virtual_board import VirtualBoard
from tests.conftest import make_config

# Conductances and read voltage exact in float32, as a board's INFO carries them: the mapping
# (from member 0's spec, read from the INFO) then computes what it computes on one emulator.
CHIP = make_config(soc=dict(tiles=2, rows=32, cols=32), device=dict(g_min_us=8.0, g_max_us=32.0),
                   periphery=dict(transpose=True, v_read=0.125), seed=5)


@pytest.fixture
def served(tmp_path):
    """A virtual board of tiles 0-1 of CHIP on a loopback socket, and CHIP's config file."""
    path = tmp_path / "chip.json"
    path.write_text(CHIP.model_dump_json())
    board = VirtualBoard(CHIP)
    url = board.open_tcp()
    board.start()
    yield url, board, path
    board.stop()


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Linear(50, 10))  # 2 x 2 blocks, then 2 x 1: 6 tiles


def _train(board, steps=3, placement=None):
    analog = convert_to_analog(_model(), board, MappingConfig(differential=True, backward="analog"), placement)
    optimizer = MixedPrecisionOptimizer(analog, lr=0.05, rule="adam")
    generator = torch.Generator().manual_seed(0)
    outputs = []
    for _ in range(steps):
        optimizer.zero_grad()
        y = analog(torch.randn(6, 40, generator=generator))
        y.square().sum().backward()
        optimizer.step()
        outputs.append(y.detach())
    return analog, optimizer, outputs


def test_a_virtual_board_plus_emulated_tiles_gives_the_numbers_of_one_emulator(served):
    url, _, chip = served
    with open_board(f"emulator:{chip}?tiles=6") as alone, \
            open_board(f"composite:{url}|emulator:{chip}?tiles=4&first_tile=2") as composite:
        assert len(composite) == 6 and [m.info()["backend"] for m in composite.members] == ["serial", "emulator"]
        expected, expected_optimizer, expected_outputs = _train(alone)
        got, optimizer, outputs = _train(composite)
        # The outputs agree to float rounding: a whole layer on one emulator sums its blocks in
        # the emulator's own layer call, across members block by block (a last-bit difference);
        # the devices, the levels and the weights agree exactly.
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(expected_outputs, outputs))
        for a, b in zip(analog_layers(expected), analog_layers(got)):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.levels, b.levels)
        assert optimizer.last_step["devices_programmed"] == expected_optimizer.last_step["devices_programmed"] > 0
        for tile_alone, tile in zip(alone, composite):  # the devices themselves, read (with read noise) alike
            assert torch.equal(tile_alone.read_conductances(), tile.read_conductances())
        each = composite.member_counters()
        assert each[0].link_bytes_out > 0 and each[1].link_bytes_out == 0  # only the serial member has a link
        assert composite.link_traffic() == composite.members[0].link_traffic()
        assert composite.members[1].link_traffic() == {}
        total = composite.counters
        assert total.products == each[0].products + each[1].products == alone.counters.products
        assert total.cycles == alone.counters.cycles
        assert composite.info()["members"][0]["link"]["frames_out"] > 0


def test_packed_layers_across_members_send_their_windows_and_give_one_emulators_numbers(served):
    """Packed on 3 tiles, both layers span the virtual board (tiles 0-1) and the emulated tile
    2, with blocks at offsets: the serial member is sent windows, the emulated one pads."""
    url, _, chip = served
    placement = plan_placement(_model(), 32, 32, tiles=3)
    assert {b.layer for b in placement.blocks if b.tile < 2} == {b.layer for b in placement.blocks if b.tile == 2}
    assert any(b.row or b.col for b in placement.blocks if b.tile < 2)
    before = VirtualBoard(CHIP, windows=False)  # firmware from before windows: sent the padding
    with before:
        before_url = before.open_tcp()
        before.start()
        with open_board(f"emulator:{chip}?tiles=3") as alone, \
                open_board(f"composite:{url}|emulator:{chip}?tiles=1&first_tile=2") as composite, \
                open_board(f"composite:{before_url}|emulator:{chip}?tiles=1&first_tile=2") as padded:
            expected, _, expected_outputs = _train(alone, placement=placement)
            runs = [_train(board, placement=placement) for board in (composite, padded)]
            for got, _, outputs in runs:
                assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(expected_outputs, outputs))
                for a, b in zip(analog_layers(expected), analog_layers(got)):
                    assert torch.equal(a.weight, b.weight) and torch.equal(a.levels, b.levels)
            for tile_alone, tile, tile_padded in zip(alone, composite, padded):  # each tile's first read
                read = tile_alone.read_conductances()
                assert torch.equal(read, tile.read_conductances()) and torch.equal(read, tile_padded.read_conductances())
            windowed, padding = (board.members[0].counters for board in (composite, padded))
            assert windowed.link_bytes_out + windowed.link_bytes_in < padding.link_bytes_out + padding.link_bytes_in


def test_a_failing_member_is_named_and_the_host_state_is_kept(served):
    url, board, chip = served
    with open_board(f"composite:{url}|emulator:{chip}?tiles=4&first_tile=2") as composite:
        analog, optimizer, _ = _train(composite, steps=1)
        x = torch.randn(6, 40)
        analog(x).square().sum().backward()
        weights = [layer.weight.detach().clone() for layer in analog_layers(analog)]
        chi = [optimizer.state[layer.weight]["chi"].clone() for layer in analog_layers(analog)]
        board.stop()  # the virtual board goes away: member 0's link is dead
        with pytest.raises(BoardError, match=f"member 0 of composite board composite:.* \\({re.escape(url)}\\)"):
            optimizer.step()
            analog(x)
        assert all(torch.equal(a, layer.weight) for a, layer in zip(weights, analog_layers(analog)))
        assert all(torch.equal(a, optimizer.state[layer.weight]["chi"]) for a, layer in zip(chi, analog_layers(analog)))


def test_composite_urls_are_checked(served):
    url, _, _ = served
    with pytest.raises(BoardError, match="must list member URLs"):
        open_board("composite:")
    with pytest.raises(BoardError, match="member 1 .* has tiles of 64x64"):
        open_board(f"composite:{url}|emulator:?tiles=2")
    # A board's INFO carries float32 values (7.6 uS is 7.5999999 there), the emulator float64
    # ones: the same spec all the same.
    with VirtualBoard(make_config(soc=dict(tiles=2, rows=32, cols=32), periphery=dict(transpose=True))) as default:
        default_url = default.open_tcp()
        default.start()
        with open_board(f"composite:{default_url}|emulator:?tiles=2&rows=32&cols=32&transpose=true") as board:
            assert board[0].spec.g_min_us != 7.6 and all(tile.spec == board[0].spec for tile in board)
    with pytest.raises(BoardError, match="member 1 of composite board .*nowhere"):
        open_board(f"composite:{url}|nowhere:")


def test_a_link_config_reaches_the_members_on_a_link_and_not_the_emulated_ones(served):
    url, _, path = served
    patient = LinkConfig(response_timeout_s=7.5, retries=5)
    with open_board(f"composite:{url}|emulator:{path}?first_tile=2", patient) as board:
        serial, emulated = board.members
        assert serial.link.config == patient and len(emulated) == 2
    with pytest.raises(BoardError, match="takes a LinkConfig for its members on a link, not EmulatorConfig"):
        open_board(f"composite:{url}", CHIP)


def test_lenet_trains_packed_on_three_reference_socs(tmp_path):
    from cim_hil.training import TrainConfig, Trainer
    from cim_hil.training.mnist import load_mnist

    boards = [VirtualBoard(make_config(seed=seed)) for seed in range(3)]  # three reference SoCs: 4 tiles each
    urls = [board.open_tcp() for board in boards]
    for board in boards:
        board.start()
    try:
        config = TrainConfig(board="composite:" + "|".join(urls), epochs=1, train_limit=32, test_limit=20,
                             batch_size=16, lr=0.05)
        trainer = Trainer(config, load_mnist(None), tmp_path, progress=False)
        assert trainer.placement.packed and trainer.placement.tiles_used == 12 and not trainer.placement.host
        row = trainer.fit()[0]
        assert row["devices_programmed"] > 0 and row["pulses"] > 0
        each = trainer.board.member_counters()
        assert all(counters.products > 0 and counters.link_bytes_in > 0 for counters in each)
        trainer.board.close()
    finally:
        for board in boards:
            board.stop()


def test_cim_hil_train_runs_lenet_on_one_reference_soc_plus_emulated_tiles(tmp_path, capsys):
    """The README's command for all of LeNet with one 4-tile board: the SoC holds tiles 0-3,
    an emulator of the same chip from tile 4 on the other 14."""
    import json

    from cim_hil.cli import main

    with VirtualBoard(make_config(seed=0)) as soc:
        url = soc.open_tcp()
        soc.start()
        code = main(["train", "--board", f"composite:{url}|emulator:?tiles=14&first_tile=4", "--epochs", "1",
                     "--train-limit", "32", "--test-limit", "16", "--batch-size", "16", "--lr", "0.05",
                     "--no-progress", "--out", str(tmp_path)])
        out, err = capsys.readouterr()
    assert code == 0, err
    assert "placement: 18 tiles of 64x64, one block per tile; on the host: nothing" in err
    summary = json.loads(out)
    soc_info, emulated_info = summary["board"]["members"]
    assert soc_info["backend"] == "serial" and soc_info["link"]["frames_out"] > 0 and emulated_info["backend"] == "emulator"
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["devices_programmed"] > 0 and json.loads((tmp_path / "placement.json").read_text())


def test_calibration_on_member_tiles_gives_the_numbers_of_one_emulator(served):
    """Calibration takes a composite's tiles like any board's: the symmetry search and
    zero-shift on the serial member's tile and on an emulated member's tile find what they
    find on the same tiles of one emulator."""
    from calibration import SymmetrySearchConfig, find_symmetry_points, zero_shift

    url, _, chip = served
    search = SymmetrySearchConfig(max_pairs=600, settle_blocks=4)
    with open_board(f"emulator:{chip}?tiles=3") as alone, \
            open_board(f"composite:{url}|emulator:{chip}?tiles=1&first_tile=2") as composite:
        for index in (0, 2):  # on the link, emulated
            expected = find_symmetry_points(alone[index], search, progress=False)
            got = find_symmetry_points(composite[index], search, progress=False, tile_index=index)
            for field in ("symmetry_us", "uncertainty_us", "stuck"):
                assert np.array_equal(expected[field], got[field], equal_nan=field != "stuck"), (index, field)
            assert np.isfinite(got["symmetry_us"]).mean() > 0.5  # found, not NaN alike
            assert np.array_equal(zero_shift(alone[index], expected)["residual_us"],
                                  zero_shift(composite[index], got)["residual_us"], equal_nan=True), index
