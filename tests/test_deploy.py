"""Deploying trained runs onto fresh chips, and post-training calibration on each.

A small convolutional model (4 tiles) stands in for LeNet where the architecture does not
matter; its checkpoints are written in the trainer's format, one trained in float on the host
and one trained with the mixed-precision optimizer on the emulator.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cim_hil.board import open_board
from cim_hil.cli import main
from cim_hil.deploy import (
    DeployConfig,
    Deployment,
    apply_calibration,
    calibrate_columns,
    deploy,
    load_calibration,
    load_trained,
)
from cim_hil.deploy.calibrate import (
    _seen_inputs,
    adc_output_error,
    calibrate_input_ranges,
    candidate_ranges,
    choose_adc_range,
    choose_input_range,
    dac_output_error,
    host_products,
    layer_inputs,
    named_analog_layers,
    set_layer_adc_range,
)
from cim_hil.deploy.deploy import accuracy, analog_weights
from cim_hil.emulator.board import build_emulator
from cim_hil.errors import CimHilError
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.nn.placement import plan_placement
from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import MNIST, load_mnist
from cim_hil.training.optimizer import MixedPrecisionOptimizer
from cim_hil.training.trainer import CHECKPOINT_FORMAT
from drivers.simulators.virtual_board import VirtualBoard

from .conftest import IDEAL, make_config

QUIET = dict(calibrate_columns=False, calibrate_inputs=False)


def tiny() -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))


@pytest.fixture(scope="module")
def data() -> MNIST:
    full = load_mnist()
    return MNIST(full.train.head(2000), full.test.head(400), full.source)


def _save(path, model, config: TrainConfig, test_acc: float):
    state = {"format": CHECKPOINT_FORMAT, "config": config.model_dump(), "epoch": 1,
             "history": [{"epoch": 1, "test_acc": test_acc}], "model": model.state_dict()}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def float_run(tmp_path_factory, data):
    torch.manual_seed(0)
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for first in range(0, len(data.train), 50):
        optimizer.zero_grad()
        F.cross_entropy(model(data.train.images[first : first + 50]), data.train.labels[first : first + 50]).backward()
        optimizer.step()
    return _save(tmp_path_factory.mktemp("float") / "checkpoint.pt", model, TrainConfig(float_baseline=True), 0.0)


@pytest.fixture(scope="module")
def chip_run(tmp_path_factory, data, float_run):
    """Mixed precision on the emulator (seed 0), starting from the float run's weights."""
    start = load_trained(float_run, tiny()).model
    board = open_board("emulator:?tiles=4&seed=0")
    model = convert_to_analog(start, board, MappingConfig(differential=True))
    optimizer = MixedPrecisionOptimizer(model, lr=3e-3, rule="adam")
    for first in range(0, 1000, 50):
        optimizer.zero_grad()
        F.cross_entropy(model(data.train.images[first : first + 50]), data.train.labels[first : first + 50]).backward()
        optimizer.step()
    trained_acc = accuracy(model, data.test)
    return _save(tmp_path_factory.mktemp("chip") / "checkpoint.pt", model, TrainConfig(), trained_acc)


@pytest.fixture
def ideal_url(tmp_path) -> str:
    """A chip without variation or noise, and with the reference chip's 8-bit converters."""
    config = make_config(device=IDEAL["device"] | dict(step_d2d=0.0), periphery=dict(adc_noise_levels=0.0))
    path = tmp_path / "ideal.json"
    path.write_text(config.model_dump_json())
    return f"emulator:{path}"


def _host_quantised(model: nn.Module, analog: nn.Module) -> nn.Module:
    """The host model with the weights the chip holds (its levels), for a noise-free comparison."""
    quantised = copy.deepcopy(model)
    for (name, layer), (_, module) in zip(named_analog_layers(analog), _mapped(quantised)):
        weight = layer.weight.detach()
        module.weight.data = layer.as_kernel(weight).contiguous() if isinstance(module, nn.Conv2d) else weight.clone()
    return quantised


def _mapped(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ---- deployment -------------------------------------------------------------------------------
def test_an_ideal_chip_reproduces_the_host_model_within_quantisation(float_run, data, tmp_path):
    trained = load_trained(float_run, tiny())
    ideal = make_config(**IDEAL)  # no noise, 24-bit converters: only the weights are quantised
    path = tmp_path / "ideal24.json"
    path.write_text(ideal.model_dump_json())
    board = open_board(f"emulator:{path}?tiles=4")
    analog = convert_to_analog(trained.model, board, trained.mapping)
    host = _host_quantised(trained.model, analog)
    images = data.test.images[:200]
    with torch.no_grad():
        assert torch.allclose(analog(images), host(images), atol=1e-3)
        # Quantising the weights costs little against the float model.
        assert abs(accuracy(analog, data.test) - accuracy(trained.model, data.test)) <= 0.02


def test_deploy_reports_the_host_accuracy_on_an_ideal_chip(float_run, data, tmp_path):
    trained = load_trained(float_run, tiny())
    path = tmp_path / "ideal24.json"
    path.write_text(make_config(**IDEAL).model_dump_json())
    report = deploy(trained, data, f"emulator:{path}?tiles=4", DeployConfig(chips=1, **QUIET), progress=False)
    assert report["write_verify_failures"]["max"] == 0
    assert abs(report["accuracy"]["mean"] - report["reference_accuracy"]) <= 0.02
    assert report["reference"] == "the host, float32"


def test_a_chip_trained_model_lands_on_exactly_its_trained_levels(chip_run, data, ideal_url):
    trained = load_trained(chip_run, tiny())
    assert trained.chip_trained and set(trained.levels) == {"1", "4"}
    deployment = Deployment(trained, data, DeployConfig(**QUIET))
    board = open_board(f"{ideal_url}?tiles=4")
    analog = convert_to_analog(trained.model, board, trained.mapping, layer_configs=deployment._configs(board))
    for name, layer in named_analog_layers(analog):
        assert torch.equal(layer.levels, trained.levels[name])
    assert deployment._failures(analog) == 0


@pytest.mark.parametrize("pack", [False, True], ids=["layer-calls", "packed-windows"])
def test_calibrated_constants_act_on_the_chip(float_run, data, tmp_path, pack):
    """On a noise-free 24-bit chip: a fixed input range clips the layer's inputs there, and
    after column gains the chip computes the host's model with the weights it now holds (the
    digital output scale undoes each column's gain exactly), forward and transposed, on both
    product paths (one layer call per layer; blocks packed into windows of shared tiles)."""
    trained = load_trained(float_run, tiny())
    path = tmp_path / "ideal24.json"
    path.write_text(make_config(**IDEAL).model_dump_json())
    placement = plan_placement(trained.model, 64, 64, pack=pack)
    analog = convert_to_analog(trained.model, open_board(f"emulator:{path}?tiles=4"), trained.mapping, placement)
    layers = dict(named_analog_layers(analog))
    assert any(layer.mapping._windows is not None for layer in layers.values()) == pack
    images = data.test.images[:50]

    def host_run(model):  # the host's model with the DAC's clipping
        return model[4](model[2:4](model[1](model[0](images).clamp(max=0.5))).clamp(max=limit))

    with torch.no_grad():
        limit = 0.5 * float(_host_quantised(trained.model, analog)[:4](images).abs().max())
        layers["4"].mapping.input_range = limit
        layers["1"].mapping.input_range = 0.5  # pixels above 0.5 saturate the DAC
        assert torch.allclose(analog(images), host_run(_host_quantised(trained.model, analog)), atol=1e-3)
        plain = {name: layer.weight.clone() for name, layer in layers.items()}
        weights = analog_weights(trained.model)
        gains = calibrate_columns(analog, weights)
        assert all(max(g) > 1 for g in gains.values())
        # The chip's outputs are the host's with the calibrated weights, not with the gained ones.
        assert torch.allclose(analog(images), host_run(_host_quantised(trained.model, analog)), atol=1e-3)
        d = torch.randn(7, 10)
        assert torch.allclose(layers["4"].mapping.backward(d), d @ layers["4"].weight, atol=1e-4)
        # What the gains buy: each column on more levels, so its weights are nearer the trained ones.
        for name, layer in layers.items():
            assert (layer.weight - weights[name]).square().sum() < (plain[name] - weights[name]).square().sum() / 2


def test_every_chip_differs_and_each_is_reproducible_from_its_seed(float_run, data):
    trained = load_trained(float_run, tiny())
    config = DeployConfig(chips=3, first_seed=40, test_limit=200, calibration_images=32)
    first = deploy(trained, data, "emulator:?seed=5", config, progress=False)
    again = Deployment(trained, data, config).run_chip("emulator:?seed=41", 41)
    assert [row["seed"] for row in first["chips"]] == [40, 41, 42]
    assert len({row["programming_pulses"] for row in first["chips"]}) == 3  # three draws of the devices
    row = first["chips"][1]
    for key in ("programming_pulses", "programming_chip_seconds", "accuracy", "calibrated_accuracy", "calibration"):
        assert again[key] == row[key]
    assert first["chips"][0]["calibration"]["input_ranges"] != row["calibration"]["input_ranges"]


def test_results_and_histogram_are_saved_and_constants_apply_to_a_chip(float_run, data, ideal_url, tmp_path):
    trained = load_trained(float_run, tiny())
    out = tmp_path / "deployed"
    report = deploy(trained, data, f"{ideal_url}?tiles=4", DeployConfig(chips=2), out, progress=False)
    saved = json.loads((out / "deployment.json").read_text())
    assert saved["calibrated_accuracy"] == report["calibrated_accuracy"]
    assert (out / "accuracy_histogram.png").read_bytes().startswith(b"\x89PNG")
    # The saved constants, applied to the same chip afresh, give the calibrated model again.
    row = saved["chips"][0]
    board = open_board(row["url"])
    analog = convert_to_analog(trained.model, board, trained.mapping)
    apply_calibration(analog, analog_weights(trained.model), load_calibration(row))
    assert accuracy(analog, data.test) == row["calibrated_accuracy"]
    for name, layer in named_analog_layers(analog):
        assert layer.mapping.input_range == row["calibration"]["input_ranges"][name]
        assert all(tile.forward_adc.full_scale == row["calibration"]["adc_ranges"][name] for tile in layer.mapping.tiles)
        # Every column's largest weight sits on the outermost level.
        assert torch.all(layer.levels.abs().amax(1) == layer.mapping.high)


def test_column_calibration_recovers_accuracy_on_a_noisy_chip(float_run, data):
    trained = load_trained(float_run, tiny())
    config = DeployConfig(chips=2, calibrate_inputs=False, calibrate_adc=False, first_seed=7)
    report = deploy(trained, data, "emulator:", config, progress=False)
    assert report["calibrated_accuracy"]["mean"] > report["accuracy"]["mean"]


def test_a_serial_board_is_one_chip_with_the_emulators_numbers(float_run, data):
    trained = load_trained(float_run, tiny())
    served = VirtualBoard(make_config(soc=dict(tiles=4), seed=9))
    url = served.open_tcp()
    served.start()
    try:
        config = DeployConfig(test_limit=100, calibration_images=16)
        over_the_line = deploy(trained, data, url, config, progress=False)
    finally:
        served.stop()
    (row,) = over_the_line["chips"]
    assert row["url"] == url and row["seed"] is None
    local = Deployment(trained, data, config).run_chip("emulator:?tiles=4&seed=9", 9)
    for key in ("programming_pulses", "accuracy", "calibrated_accuracy", "calibration"):
        assert row[key] == local[key]


# ---- input ranges -----------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tail=st.floats(0.5, 4.0), bits=st.sampled_from([4, 6, 8]))
def test_the_chosen_input_range_never_has_more_dac_error_than_no_clipping(seed, tail, bits):
    generator = torch.Generator().manual_seed(seed)
    # ReLU-like activations with a heavy tail, and random weights.
    inputs = torch.relu(torch.randn(500, 30, generator=generator)) ** tail
    weights = torch.randn(12, 30, generator=generator)
    chosen, errors = choose_input_range(inputs, weights, bits)
    largest = float(inputs.abs().max())
    assert errors[chosen] <= dac_output_error(inputs, weights, largest, bits)
    assert min(candidate_ranges(inputs)) > 0 and max(candidate_ranges(inputs)) == largest


def test_input_calibration_on_a_chip_never_raises_the_dac_error(float_run, data):
    trained = load_trained(float_run, tiny())
    report = deploy(trained, data, "emulator:?seed=3", DeployConfig(chips=1, calibrate_columns=False,
                    calibration_images=64, test_limit=100), progress=False)
    ranges = report["chips"][0]["calibration"]["input_ranges"]
    # Replay the calibration images on the same chip and measure each layer's DAC error.
    board = open_board("emulator:?seed=3&tiles=4")
    analog = convert_to_analog(trained.model, board, trained.mapping)
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
             for name, layer in named_analog_layers(analog)]
    with torch.no_grad():
        analog(data.train.images[:64])
    for hook in hooks:
        hook.remove()
    for name, layer in named_analog_layers(analog):
        inputs, weights = layer_inputs(layer, seen[name])
        bits = layer.mapping.spec.input_bits
        assert dac_output_error(inputs, weights, ranges[name], bits) <= dac_output_error(
            inputs, weights, float(inputs.abs().max()), bits) * (1 + 1e-6)


def test_a_convolutions_patches_line_up_with_its_kernel(float_run, data):
    trained = load_trained(float_run, tiny())
    analog = convert_to_analog(trained.model, open_board("emulator:?tiles=4"), trained.mapping)
    conv = dict(named_analog_layers(analog))["1"]
    x = torch.rand(3, 1, 14, 14)
    patches, weights = layer_inputs(conv, x)
    expected = F.conv2d(x, conv.as_kernel(conv.weight.detach()), stride=2)
    assert torch.allclose(patches @ weights.T, expected.permute(0, 2, 3, 1).reshape(-1, 4), atol=1e-5)


# ---- ADC ranges -------------------------------------------------------------------------------
def test_the_chosen_adc_range_never_has_more_output_error_than_the_power_on_one(float_run, data):
    """On a chip whose products are deterministic once programmed (programming error and
    device variation, no read or ADC noise), after the column and input steps as a deployment
    runs them: each layer's chosen range, replayed, has no more output error on the calibration
    batches than the power-on range, and the step changes something."""
    trained = load_trained(float_run, tiny())
    config = make_config(soc=dict(tiles=4), seed=21, device=dict(read_noise_levels=0.0),
                         periphery=dict(adc_noise_levels=0.0))
    analog = convert_to_analog(trained.model, build_emulator(config), trained.mapping)
    images = data.train.images[:64]
    calibrate_columns(analog, analog_weights(trained.model))
    calibrate_input_ranges(analog, images)
    gains = []
    with torch.no_grad():
        for name, layer in named_analog_layers(analog):
            x = _seen_inputs(analog, layer, images)
            chosen, errors = choose_adc_range(layer, x)
            reference = host_products(layer, x)
            power_on = layer.mapping.tiles[0].set_adc_range(None) * 127
            set_layer_adc_range(layer, None)
            replayed_power_on = adc_output_error(layer, x, reference)
            set_layer_adc_range(layer, chosen)
            replayed_chosen = adc_output_error(layer, x, reference)
            assert replayed_chosen <= replayed_power_on
            assert (replayed_chosen, replayed_power_on) == (errors[chosen], errors[power_on])
            gains.append(replayed_power_on / replayed_chosen)
    assert max(gains) > 1.2  # a range fitted to the layer's currents beats the power-on one somewhere


def test_a_chip_that_cannot_set_its_adc_range_is_refused_before_programming(lenet_run, offline_data, float_run,
                                                                            data, tmp_path, capsys):
    path = tmp_path / "fixed_adc.json"
    path.write_text(make_config(soc=dict(tiles=18), periphery=dict(adc_range_settable=False)).model_dump_json())
    trained = load_trained(float_run, tiny())
    with pytest.raises(CimHilError, match="cannot set its ADC range .* --no-adc-calibration"):
        deploy(trained, data, f"emulator:{path}", DeployConfig(chips=1), progress=False)
    assert main(["deploy", str(lenet_run), "--no-progress", "--board", f"emulator:{path}"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("cim-hil: error:")] == [
        f"cim-hil: error: the chip at emulator:{path}?seed=1000 cannot set its ADC range (no 'adc_range' capability); "
        "deploy with --no-adc-calibration"]
    report = deploy(trained, data, f"emulator:{path}", DeployConfig(chips=1, calibrate_adc=False, test_limit=50,
                                                                     calibration_images=16), progress=False)
    assert report["chips"][0]["calibration"]["adc_ranges"] == {}


# ---- errors -----------------------------------------------------------------------------------
def test_a_checkpoint_of_another_model_is_refused(float_run):
    with pytest.raises(CimHilError, match="holds another model"):
        load_trained(float_run)  # LeNet-5 by default


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CimHilError, match="cannot be read"):
        load_trained(path)


def test_a_board_too_small_is_refused_before_programming(float_run, data):
    trained = load_trained(float_run, tiny())
    with pytest.raises(CimHilError, match="too small: the model needs 4 tiles"):
        deploy(trained, data, "emulator:?tiles=2", DeployConfig(chips=1), progress=False)


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("lenet")
    config = TrainConfig(float_baseline=True, epochs=1, train_limit=300, test_limit=100)
    Trainer(config, data, out, progress=False).fit()
    return out


@pytest.fixture
def offline_data(data, monkeypatch):
    """The CLI reads the data the other tests use (reading it again costs seconds, tests nothing)."""
    monkeypatch.setattr("cim_hil.training.mnist.load_mnist", lambda *args, **kwargs: data)


def test_the_cli_deploys_a_run_and_reports_it(lenet_run, offline_data, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["deploy", str(lenet_run), "--chips", "1", "--first-seed", "3", "--out", str(out), "--no-progress",
                 "--calibration-images", "32"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seeds"] == [3] and summary["test_digits"] == 100 and "calibrated_accuracy" in summary
    assert (out / "deployment.json").is_file() and (out / "accuracy_histogram.png").is_file()


@pytest.mark.parametrize("arguments, message", [
    (["--board", "emulator:?tiles=3"], "too small: the model needs 18 tiles"),
    (["--chips", "0"], "chips"),
])
def test_cli_errors_are_one_line(lenet_run, offline_data, arguments, message, capsys):
    assert main(["deploy", str(lenet_run), "--no-progress", *arguments]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cim-hil: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_cli_refuses_another_models_checkpoint_in_one_line(float_run, capsys):
    assert main(["deploy", str(float_run), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds another model" in error[0]


# ---- accuracy after relaxation ----------------------------------------------------------------
def _relaxing_url(tmp_path, periphery=None, **device) -> str:
    path = tmp_path / "relaxing.json"
    path.write_text(make_config(soc=dict(tiles=4), device=device, periphery=periphery or {}).model_dump_json())
    return f"emulator:{path}"


def test_accuracy_after_each_time_is_reported_and_reproducible(float_run, data, tmp_path):
    trained = load_trained(float_run, tiny())
    config = DeployConfig(chips=2, calibrate_adc=False, calibration_images=16, test_limit=200,
                          relax_after_s=(86400, 1, 3600))
    strong = _relaxing_url(tmp_path, relaxation_spread_levels=3.0)  # a day spreads devices by 6.7 levels
    report = deploy(trained, data, strong, config, progress=False)
    assert [after["seconds"] for after in report["relaxed_accuracy"]] == [1, 3600, 86400]
    assert all({"mean", "std", "min", "max"} <= set(after) for after in report["relaxed_accuracy"])
    assert report["relaxed_accuracy"][-1]["mean"] < report["calibrated_accuracy"]["mean"] - 0.05
    again = deploy(trained, data, strong, config, progress=False)
    assert [row["relaxed"] for row in again["chips"]] == [row["relaxed"] for row in report["chips"]]
    # Without read or ADC noise every evaluation of a chip gives the same answer, so the model off
    # must give the calibrated accuracy after every wait.
    quiet = _relaxing_url(tmp_path, dict(adc_noise_levels=0.0), read_noise_levels=0.0, relaxation_drift=0.0,
                          relaxation_spread_levels=0.0)
    off = deploy(trained, data, quiet, config, progress=False)
    for row in off["chips"]:
        assert [after["accuracy"] for after in row["relaxed"]] == [row["calibrated_accuracy"]] * 3


def test_a_chip_that_cannot_wait_is_refused_before_programming(float_run, data):
    served = VirtualBoard(make_config(soc=dict(tiles=4)))
    url = served.open_tcp()
    served.start()
    try:
        with pytest.raises(CimHilError, match="cannot let time pass.*without --relax"):
            deploy(load_trained(float_run, tiny()), data, url, DeployConfig(relax_after_s=(1,)), progress=False)
        with open_board(url) as board:
            assert board.counters.pulses == 0 and board.counters.verify_trials == 0
    finally:
        served.stop()


def test_the_cli_reports_accuracy_after_relaxation(lenet_run, offline_data, tmp_path, capsys):
    out = tmp_path / "relaxed"
    assert main(["deploy", str(lenet_run), "--chips", "1", "--out", str(out), "--no-progress", "--no-adc-calibration",
                 "--calibration-images", "16", "--relax", "1s,1h,1d"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [after["seconds"] for after in summary["relaxed_accuracy"]] == [1, 3600, 86400]
    saved = json.loads((out / "deployment.json").read_text())
    assert saved["relaxed_accuracy"] == summary["relaxed_accuracy"]


@pytest.mark.parametrize("times", ["1x", "-1s", "h", "1s,,1d", "nanh"])
def test_a_bad_time_to_relax_is_one_line(lenet_run, offline_data, times, capsys):
    assert main(["deploy", str(lenet_run), "--no-progress", f"--relax={times}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cim-hil: error:")]
    assert len(errors) == 1 and "is not a time" in errors[0] and "Traceback" not in err
