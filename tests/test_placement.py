"""Placement of layers' blocks on tiles, packing small blocks on windows, host layers."""

import json

import pytest
import torch

from cim_hil.cli import main
from cim_hil.emulator import build_emulator
from cim_hil.errors import ConfigError, PlacementError, ShapeError
from cim_hil.nn import MappingConfig, analog_layers, convert_to_analog
from cim_hil.nn.placement import fitting_host_layers, plan_placement
from cim_hil.training import MixedPrecisionOptimizer
from cim_hil.training.lenet import lenet5
from tests.conftest import IDEAL, make_config


def ideal_board(tiles):
    return build_emulator(make_config(device=IDEAL["device"], periphery=IDEAL["periphery"], soc=dict(tiles=tiles)))


def _covered(placement):
    """Every device each block covers, as (tile, row, col), checked not to overlap."""
    seen = set()
    for block in placement.blocks:
        assert 0 <= block.row and block.row + block.rows <= placement.rows
        assert 0 <= block.col and block.col + block.cols <= placement.cols
        cells = {(block.tile, r, c) for r in range(block.row, block.row + block.rows)
                 for c in range(block.col, block.col + block.cols)}
        assert not cells & seen, f"block {block} overlaps another"
        seen |= cells
    return seen


def test_lenet_takes_18_tiles_unpacked_and_12_packed_without_overlaps():
    model = lenet5()
    unpacked, packed = plan_placement(model, 64, 64, pack=False), plan_placement(model, 64, 64)
    assert unpacked.tiles_used == 18 and packed.tiles_used == 12
    # Every weight has exactly one device in both plans.
    assert len(_covered(unpacked)) == len(_covered(packed)) == 44_190
    assert packed.device_use() == [sum(b.rows * b.cols for b in packed.blocks if b.tile == t) for t in range(12)]
    # The unpacked plan is the layout convert_to_analog always used: block i of the model alone on tile i.
    assert [(b.tile, b.row, b.col) for b in unpacked.blocks] == [(i, 0, 0) for i in range(18)]


def test_lenet_on_one_reference_soc_keeps_its_largest_layer_on_the_host():
    model = lenet5()
    host = fitting_host_layers(model, 64, 64, tiles=4)
    assert host == ("7",)  # the 256x120 Linear: 30,720 of LeNet's 44,190 weights
    placement = plan_placement(model, 64, 64, host_layers=host, tiles=4)
    assert placement.tiles_used == 4 and not any(b.layer == "7" for b in placement.blocks)
    assert len(_covered(placement)) == 44_190 - 256 * 120
    # On reference SoCs side by side (a composite board of 64x64 tiles), all of LeNet takes three, packed.
    assert plan_placement(model, 64, 64, tiles=12).tiles_used == 12


def test_a_model_that_does_not_fit_gets_the_ways_out():
    with pytest.raises(PlacementError) as error:
        plan_placement(lenet5(), 64, 64, pack=False, tiles=4, where="the board at socket://127.0.0.1:1")
    message = str(error.value)
    assert "needs 18 tiles of 64x64 (12 packed), the board at socket://127.0.0.1:1 has 4" in message
    assert "keep layers 7 on the host" in message and "at least 12 tiles" in message and "composite" in message
    with pytest.raises(PlacementError, match="pack small blocks"):
        plan_placement(lenet5(), 64, 64, pack=False, tiles=12)
    with pytest.raises(ConfigError, match="host_layers \\['8'\\] are not"):
        plan_placement(lenet5(), 64, 64, host_layers=["8"])


def test_products_on_packed_windows_equal_unpacked_ones_on_ideal_tiles():
    torch.manual_seed(0)
    model = lenet5()
    config = MappingConfig(backward="analog")
    unpacked_board = ideal_board(18)
    unpacked = convert_to_analog(model, unpacked_board, config)
    packed_board = ideal_board(12)
    packed = convert_to_analog(model, packed_board, config, plan_placement(model, 64, 64))
    for a, b in zip(analog_layers(unpacked), analog_layers(packed)):
        assert torch.equal(a.weight, b.weight)  # ideal programming lands every device on its level
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    x_packed = x.detach().clone().requires_grad_(True)
    out, out_packed = unpacked(x), packed(x_packed)
    assert torch.allclose(out, out_packed, atol=1e-4)
    out.square().sum().backward()
    out_packed.square().sum().backward()  # transpose products on the same windows
    assert torch.allclose(x.grad, x_packed.grad, atol=1e-4, rtol=1e-4)
    # One product per block and sample either way: packing saves tiles, not products.
    assert sum(t.counters.products for t in packed_board) == sum(t.counters.products for t in unpacked_board) == 2346


def test_a_window_product_drives_only_its_rows_and_converts_only_its_columns():
    board = ideal_board(1)
    tile = board[0]
    spec = tile.spec
    generator = torch.Generator().manual_seed(3)
    targets = spec.g_min_us + (spec.g_max_us - spec.g_min_us) * torch.rand(64, 64, generator=generator)
    tile.program_reference(torch.full((64, 64), spec.g_min_us))
    tile.program_verify(targets)
    g = tile.read_conductances() - tile.read_reference()  # no read noise: exactly what the product uses
    x = torch.rand(5, 20, generator=generator) * 2 - 1
    window = (30, 50, 40, 52)
    y = tile.forward(x, 12, origin=(30, 40))
    # Only the window's devices contribute: every other row is at 0 V, no other column is converted.
    assert torch.allclose(y, x @ g[30:50, 40:52] * spec.v_read, atol=1e-4)
    d = torch.rand(5, 12, generator=generator) * 2 - 1
    assert torch.allclose(tile.backward(d, 20, origin=(30, 40)), d @ g[30:50, 40:52].T * spec.v_read, atol=1e-4)
    together = board.group([tile, tile]).forward(torch.stack([x, x]), [12, 4], windows=[window, (0, 20, 0, 4)])
    assert torch.allclose(together[0], y, atol=1e-5)
    assert torch.allclose(together[1, :, :4], x @ g[:20, :4] * spec.v_read, atol=1e-4)
    assert not together[1, :, 4:].any()
    with pytest.raises(ShapeError, match="outside"):
        tile.forward(x, origin=(64, 0))
    with pytest.raises(ShapeError, match="at origin \\(44, 0\\) must have shape \\(batch, k\\) with 1 <= k <= 20"):
        tile.forward(torch.zeros(1, 21), origin=(44, 0))
    with pytest.raises(ShapeError, match=r"outputs from column 40 \(origin \(0, 40\)\) must be between 1 and 24"):
        tile.forward(x, 25, origin=(0, 40))
    with pytest.raises(ShapeError, match="do not fit the window"):
        board.group([tile]).forward(x.unsqueeze(0), [13], windows=[window])


def test_cim_hil_plan_prints_the_placement_and_saves_its_picture(tmp_path, capsys):
    picture = tmp_path / "plan.png"
    assert main(["plan", "--model", "lenet5", "--out", str(picture)]) == 0
    assert "12 tiles; 12 packed, 18 unpacked" in capsys.readouterr().out and picture.stat().st_size > 10_000
    assert main(["plan", "--board", "emulator:?tiles=4", "--out", str(picture)]) == 2
    refused = capsys.readouterr().err
    assert refused.startswith("cim-hil: error: the model needs 18 tiles") and refused.count("\n") == 1
    assert "ways out" in refused and "keep layers 7 on the host" in refused
    assert main(["plan", "--board", "emulator:?tiles=4", "--host-layers", "auto", "--out", str(picture)]) == 0
    fits = capsys.readouterr().out
    assert "4 tiles; 4 packed, 10 unpacked" in fits and "7 (Linear 256x120)" in fits and "on the host" in fits


@pytest.mark.parametrize("out, says", [
    ("plan", "--out {out}: name the picture with one of the suffixes"),
    ("no-such-dir/plan.png", "--out {out}: cannot save the picture there (File exists: {out.parent})"),
])
def test_cim_hil_plan_names_a_picture_path_it_cannot_write(tmp_path, capsys, out, says):
    (tmp_path / "no-such-dir").write_text("a file, not a directory")
    path = tmp_path / out
    assert main(["plan", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cim-hil: error: ") and says.format(out=path) in err and "Traceback" not in err
    assert not path.exists() and not path.with_suffix(".png").exists()


def test_training_steps_on_layers_packed_on_one_tile_keep_host_and_devices_in_step():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5))
    board = ideal_board(1)
    placement = plan_placement(model, 64, 64, tiles=1)
    assert {(b.tile, b.row, b.col) for b in placement.blocks} == {(0, 0, 0), (0, 20, 0)}  # the second below the first
    analog = convert_to_analog(model, board, MappingConfig(differential=True), placement)
    optimizer = MixedPrecisionOptimizer(analog, lr=0.05, rule="sgd")
    for _ in range(5):
        optimizer.zero_grad()
        analog(torch.randn(8, 20)).square().sum().backward()
        optimizer.step()
    assert optimizer.last_step["devices_programmed"] > 0
    g = board[0].read_conductances() - board[0].read_reference()  # one array holds both layers
    for layer in analog_layers(analog):
        on_devices = layer.mapping.from_tiles(g.unsqueeze(0)) * layer.mapping.scale
        assert torch.allclose(layer.weight, on_devices, atol=1e-5)


def test_lenet_trains_on_one_reference_soc_over_its_link_with_the_rest_on_the_host(tmp_path, capsys):
    from drivers.simulators.virtual_board import VirtualBoard

    board = VirtualBoard(make_config())  # the reference SoC: 4 tiles of 64x64
    url = board.open_tcp()
    board.start()
    try:
        assert main(["train", "--board", url, "--host-layers", "auto", "--epochs", "1", "--train-limit", "16",
                     "--test-limit", "10", "--batch-size", "16", "--no-progress", "--out", str(tmp_path)]) == 0
    finally:
        board.stop()
    err = capsys.readouterr().err
    assert "placement: 4 tiles of 64x64, packed; on the host: 7 (Linear 256x120)" in err
    recorded = json.loads((tmp_path / "placement.json").read_text())
    assert recorded["tiles"] == 4 and recorded["host_layers"] == ["7 (Linear 256x120)"]
    assert recorded["tiles_unpacked"] == 10 and "11 (Linear 84x10)" in recorded["analog_layers"]
