"""Analog layers, the mixed-precision updater and the trainer."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cim_hil import open_board
from cim_hil.emulator import build_emulator
from cim_hil.errors import CimHilError, UnsafeValueError
from cim_hil.nn import AnalogConv2d, AnalogLinear, MappingConfig, convert_to_analog
from cim_hil.training import MixedPrecisionOptimizer, TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist, read_idx
from tests.conftest import IDEAL, make_config


def ideal_board(tiles=8, levels=16):
    device = {**IDEAL["device"], "levels": levels}
    return build_emulator(make_config(device=device, periphery=IDEAL["periphery"], soc=dict(tiles=tiles)))


@pytest.mark.parametrize("backward", ["analog", "digital"])
def test_analog_gradients_equal_float_gradients_on_ideal_devices(backward):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 70))
    analog = convert_to_analog(model, ideal_board(), MappingConfig(backward=backward))
    assert isinstance(analog[0], AnalogConv2d) and isinstance(analog[3], AnalogLinear)
    # The float twin holds exactly what was programmed (weights snap to device levels).
    model[0].weight.data = analog[0].as_kernel(analog[0].weight.detach()).clone()
    model[3].weight.data = analog[3].weight.detach().clone()
    x = torch.randn(5, 2, 6, 6, requires_grad=True)
    x_float = x.detach().clone().requires_grad_(True)
    target = torch.randn(5, 70)
    F.mse_loss(analog(x), target).backward()
    F.mse_loss(model(x_float), target).backward()
    assert torch.allclose(analog(x), model(x_float), atol=1e-4)
    assert torch.allclose(x.grad, x_float.grad, atol=1e-5)
    assert torch.allclose(analog[3].weight.grad, model[3].weight.grad, atol=1e-5)
    assert torch.allclose(analog[0].as_kernel(analog[0].weight.grad), model[0].weight.grad, atol=1e-5)
    assert torch.allclose(analog[3].bias.grad, model[3].bias.grad, atol=1e-6)


def test_layer_spans_several_tiles_and_sums_partial_products():
    layer = nn.Linear(150, 70)  # 3 x 2 blocks of 64 x 64
    board = ideal_board(tiles=6)
    analog = convert_to_analog(nn.Sequential(layer), board)[0]
    x = torch.randn(4, 150)
    assert torch.allclose(analog(x), x @ analog.weight.T + analog.bias, atol=1e-4)
    assert all(tile.counters.products == 4 for tile in board)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backward", ["analog", "digital"])
def test_a_layer_refuses_nan_or_infinite_inputs_and_counts_no_product(bad, backward):
    model = nn.Sequential(nn.Conv2d(12, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 70))  # 108 inputs: two blocks
    board = ideal_board()
    analog = convert_to_analog(model, board, MappingConfig(backward=backward))
    for layer, shape in ((analog[0], (2, 12, 6, 6)), (analog[2], (2, 48))):
        x = torch.randn(shape)
        x.view(-1)[7] = bad
        with pytest.raises(UnsafeValueError, match="the layer's inputs contain NaN or infinite values"):
            layer(x)
    assert all(tile.counters.products == 0 for tile in board)


def test_model_needing_more_tiles_than_the_board_has_is_refused_with_the_count():
    model = nn.Sequential(nn.Linear(200, 100))  # 4 x 2 = 8 tiles
    with pytest.raises(CimHilError, match="needs 8 tiles of 64x64.*has 4"):
        convert_to_analog(model, open_board("emulator:"))


@pytest.mark.parametrize("backward", ["analog", "digital"])
@pytest.mark.parametrize("geometry", [dict(stride=2, dilation=2, padding=(1, 2)), dict(stride=(1, 2), dilation=(2, 1))])
@pytest.mark.parametrize("channels", [3, 12])  # 18 inputs fit one tile; 72 are cut into two blocks
def test_analog_convolution_matches_torch_for_strides_dilations_and_padding(geometry, backward, channels):
    # Forward: the patch matrix (column-major on one tile, rows from a channels-last image on
    # several) and the per-patch input scale come from strided views of the image. Backward:
    # the image's gradient is folded back from transpose products, or taken as a transposed
    # convolution on the host, and must land on the right pixels either way.
    torch.manual_seed(1)
    conv = nn.Conv2d(channels, 4, (3, 2), **geometry)
    analog = convert_to_analog(nn.Sequential(conv), ideal_board(tiles=2), MappingConfig(backward=backward))[0]
    conv.weight.data = analog.as_kernel(analog.weight.detach()).clone()
    x = torch.randn(2, channels, 11, 9, requires_grad=True)
    x_float = x.detach().clone().requires_grad_(True)
    y, y_float = analog(x), conv(x_float)
    assert torch.allclose(y, y_float, atol=1e-4)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_float.backward(grad)
    assert torch.allclose(x.grad, x_float.grad, atol=1e-4)
    assert torch.allclose(analog.as_kernel(analog.weight.grad), conv.weight.grad, atol=1e-4)


def one_layer(tiles_config=None, mapping=None):
    board = build_emulator(tiles_config or make_config(soc=dict(tiles=1)))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    model = convert_to_analog(model, board, mapping or MappingConfig())
    return model, board


def step_with_gradient(model, optimizer, grad):
    optimizer.zero_grad()
    model[0].weight.grad = grad.clone()
    optimizer.step()


def test_chi_is_conserved_when_a_device_at_its_bound_refuses():
    model, _ = one_layer()
    layer = model[0]
    optimizer = MixedPrecisionOptimizer(model, lr=1.0, rule="sgd")
    with torch.no_grad():
        layer.levels.fill_(layer.mapping.high)  # host view: every device at the top level
    push_up = -torch.full_like(layer.weight, 3.5 * layer.granularity)
    step_with_gradient(model, optimizer, push_up)
    chi = optimizer.state[layer.weight]["chi"]
    # Nothing could be applied, so the whole update is still owed.
    assert torch.allclose(chi, torch.full_like(chi, 3.5 * layer.granularity))
    assert int(optimizer.state[layer.weight]["writes"].sum()) == 0
    # Pushing back down applies steps, and chi drops by exactly what was applied.
    before_weight = layer.weight.detach().clone()
    step_with_gradient(model, optimizer, -push_up * 2)
    applied = layer.weight.detach() - before_weight
    chi = optimizer.state[layer.weight]["chi"]
    assert applied.abs().min() > 0
    assert torch.allclose(chi + applied, torch.full_like(chi, -3.5 * layer.granularity), atol=1e-6)


def test_chi_is_conserved_when_write_verify_fails():
    config = make_config(soc=dict(tiles=1), device=dict(stuck_fraction=0.5))
    model, board = one_layer(config)
    layer = model[0]
    optimizer = MixedPrecisionOptimizer(model, lr=1.0, rule="sgd")
    total = torch.zeros_like(layer.weight)
    start = layer.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        grad = torch.randn(layer.weight.shape, generator=generator) * 2 * layer.granularity
        total -= grad
        step_with_gradient(model, optimizer, grad)
    chi = optimizer.state[layer.weight]["chi"]
    # Every update is either applied (the host's weight moved) or still in chi: none lost, none twice.
    assert torch.allclose(layer.weight.detach() - start + chi, total, atol=1e-5)
    assert board[0].devices.stuck[:8, :4].any()


def test_host_copies_are_views_of_one_store_that_loads_write_into_and_nothing_replaces():
    board = ideal_board(tiles=2)
    torch.manual_seed(0)
    model = convert_to_analog(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 3)), board, MappingConfig())
    store = model[0].stored.store
    assert model[1].stored.store is store
    assert model[0].weight.data_ptr() == store.weights.data_ptr()
    assert model[1].levels.data_ptr() == store.levels[32:].data_ptr()
    # Rebinding a layer's tensor would cut it off from the store: refused, nothing changed.
    before = model.state_dict()
    for name in ("levels", "weight"):
        with pytest.raises(CimHilError, match=f"{name} is a view of its weight store"):
            setattr(model[0], name, getattr(model[0], name).detach().clone())
    with pytest.raises(RuntimeError, match="never replaced"):  # torch's load gathers the layers' errors
        model.load_state_dict(before, assign=True)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    # A load writes into the store in place, and the next step programs from what was loaded.
    optimizer = MixedPrecisionOptimizer(model, lr=1.0, rule="sgd")
    loaded = {key: value.clone() for key, value in before.items()}
    loaded["0.levels"] = torch.zeros_like(loaded["0.levels"])
    loaded["0.weight"] = torch.zeros_like(loaded["0.weight"])
    model.load_state_dict(loaded)
    assert not store.levels[:32].any() and not store.weights[:32].any()
    optimizer.zero_grad()
    for layer in model:
        layer.weight.grad = -2 * layer.granularity * torch.ones_like(layer.weight)
    optimizer.step()
    assert (model[0].levels == 2).all()  # from zero, as loaded, two steps up
    for layer in model:
        assert torch.equal(layer.weight.detach(), layer.mapping.weights_for(layer.levels))
    # The devices hold what the host believes: ideal devices read back the host's copy.
    for layer in model:
        assert torch.allclose(layer(torch.eye(layer.in_features)) - layer.bias, layer.weight.T, atol=1e-4)


def test_pulse_programming_accounts_for_applied_pulses():
    model, board = one_layer(mapping=MappingConfig(programming="pulses"))
    layer = model[0]
    optimizer = MixedPrecisionOptimizer(model, lr=1.0, rule="sgd")
    start = layer.weight.detach().clone()
    grad = torch.zeros_like(layer.weight)
    grad[0, 0] = -2.2 * layer.granularity  # two pulses up, 0.2 left over
    pulses_before = board.counters.pulses
    step_with_gradient(model, optimizer, grad)
    assert board.counters.pulses - pulses_before == 2
    assert (layer.weight[0, 0].item() - start[0, 0].item()) == pytest.approx(2 * layer.granularity)
    assert float(optimizer.state[layer.weight]["chi"][0, 0]) == pytest.approx(0.2 * layer.granularity, rel=1e-4)


@pytest.mark.parametrize("rule, twin", [
    ("adam", lambda params: torch.optim.Adam(params, lr=0.01)),
    ("sgd", lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)),
])
def test_the_rule_steps_digital_parameters_as_torch_does(rule, twin):
    """The rule runs on all parameters end to end; a parameter without a gradient in some step
    falls behind in steps (Adam's bias correction then differs per parameter)."""
    board = ideal_board(tiles=2)
    model = convert_to_analog(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 3)), board, MappingConfig())
    optimizer = MixedPrecisionOptimizer(model, lr=0.01, rule=rule, momentum=0.9)
    biases = [layer.bias for layer in model]
    twins = [bias.detach().clone().requires_grad_(True) for bias in biases]
    reference = twin(twins)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        if step in (1, 2):
            biases[0].grad = None
        for bias, copy in zip(biases, twins):
            copy.grad = None if bias.grad is None else bias.grad.clone()
        optimizer.step()
        reference.step()
        for bias, copy in zip(biases, twins):
            assert torch.allclose(bias, copy, rtol=1e-6, atol=1e-7)
    assert [optimizer.state[bias]["step"] for bias in biases] == [3, 5]


def test_differential_mapping_uses_both_devices():
    board = ideal_board(tiles=1)
    analog = convert_to_analog(nn.Sequential(nn.Linear(10, 5)), board, MappingConfig(differential=True))[0]
    x = torch.randn(3, 10)
    assert torch.allclose(analog(x), x @ analog.weight.T + analog.bias, atol=1e-4)
    assert analog.mapping.low == -15 and analog.mapping.high == 15


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def small(**overrides):
    return TrainConfig(train_limit=160, test_limit=100, epochs=2, batch_size=32, **overrides)


def test_checkpoint_then_resume_continues_bit_for_bit(mnist, tmp_path):
    straight = Trainer(small(), mnist, tmp_path / "straight", progress=False)
    straight.fit()
    interrupted = Trainer(small(), mnist, tmp_path / "resumed", progress=False)
    interrupted.fit(1)
    del interrupted
    resumed = Trainer.resume(tmp_path / "resumed", mnist, progress=False)
    assert resumed.epoch == 1
    resumed.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    chi = lambda t: [s["chi"] for s in t.optimizer.state.values() if "chi" in s]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(chi(straight), chi(resumed)))
    assert torch.equal(straight.board[5].devices.g, resumed.board[5].devices.g)
    drop_time = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    assert drop_time(straight.history) == drop_time(resumed.history)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_resume_without_checkpoint_is_a_clear_error(mnist, tmp_path):
    with pytest.raises(CimHilError, match="no checkpoint"):
        Trainer.resume(tmp_path, mnist)


def test_a_checkpoint_of_another_format_is_refused_not_misread(mnist, tmp_path):
    Trainer(small(), mnist, tmp_path, progress=False).fit(1)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del state["format"]  # as written before formats were marked (kernels flattened channels first)
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CimHilError, match="format 1, this one reads 2"):
        Trainer.resume(tmp_path, mnist)


def test_lenet_learns_on_the_emulator_well_above_chance(mnist, tmp_path):
    """The CI run of the main job: a shortened but real mixed-precision training of LeNet-5."""
    config = TrainConfig(train_limit=2000, test_limit=1000, epochs=2)
    trainer = Trainer(config, mnist, tmp_path, progress=False)
    history = trainer.fit()
    assert history[-1]["test_acc"] > 0.6  # chance is 0.1
    assert history[-1]["write_reduction"] > 10
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_cli_train_writes_a_run_and_errors_are_one_line(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "cim_hil.cli", "train", "--train-limit", "64", "--test-limit", "50",
         "--epochs", "1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["epochs"] == 1 and 0 <= summary["test_acc"] <= 1
    assert {p.name for p in out.iterdir()} >= {"metrics.jsonl", "curves.png", "checkpoint.pt"}
    bad = subprocess.run(
        [sys.executable, "-m", "cim_hil.cli", "train", "--board", "nowhere:", "--out", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2
    assert "no driver for board URL 'nowhere:'" in bad.stderr and "Traceback" not in bad.stderr
    bad_epochs = subprocess.run(
        [sys.executable, "-m", "cim_hil.cli", "train", "--epochs", "0", "--out", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=300,
    )
    assert bad_epochs.returncode == 2 and "epochs" in bad_epochs.stderr and "Traceback" not in bad_epochs.stderr


def test_idx_reader_rejects_truncated_files(tmp_path):
    good = tmp_path / "t.idx"
    good.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    cut = tmp_path / "cut.idx"
    cut.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(CimHilError, match="truncated"):
        read_idx(cut)
