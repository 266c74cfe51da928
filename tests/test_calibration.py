"""Calibration on the emulator, whose per-device parameters are known."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from calibration import (
    CalibrationResult,
    CharacterisationConfig,
    SymmetrySearchConfig,
    characterise,
    emulator_config_from_fit,
    find_symmetry_points,
    zero_shift,
)
from cim_hil.emulator import build_emulator
from cim_hil.errors import CapabilityError, CimHilError, ConfigError
from tests.conftest import make_config

IMBALANCED = dict(step_up_us=2.0, step_down_us=0.8, step_d2d=0.3, stuck_fraction=0.02)


@pytest.fixture(scope="module")
def calibrated():
    tile = build_emulator(make_config(device=IMBALANCED, soc=dict(tiles=1)))[0]
    return tile, find_symmetry_points(tile, progress=False)


def step_at_symmetry(devices):
    g_star = devices.symmetry_point()
    return g_star, devices.a_up * (devices.g_max - g_star) / (devices.g_max - devices.g_min)


def test_symmetry_points_within_one_step_for_99_percent_and_stuck_flagged(calibrated):
    tile, result = calibrated
    estimate = torch.from_numpy(result["symmetry_us"])
    truth, step = step_at_symmetry(tile.devices)
    found = ~torch.isnan(estimate)
    within = ((estimate - truth).abs() <= step) & found
    assert within.sum() / (~tile.devices.stuck).sum() >= 0.99
    assert np.array_equal(result["stuck"], tile.devices.stuck.numpy())
    assert torch.isnan(estimate[tile.devices.stuck]).all()  # flagged, never averaged in
    assert (result["uncertainty_us"][found.numpy()] < step.numpy()[found.numpy()]).mean() > 0.99
    assert result.metadata.summary["pulses_per_device"] > 0


def test_zero_shift_programs_references_and_leaves_small_residuals(calibrated):
    tile, result = calibrated
    shifted = zero_shift(tile, result)
    residual = shifted["residual_us"]
    usable = ~np.isnan(residual)
    assert usable.sum() == result.metadata.summary["converged"]
    spacing = tile.spec.level_spacing_us
    assert (np.abs(residual[usable]) <= 2 * spacing).mean() > 0.98
    assert abs(np.nanmean(residual)) < 0.2 * spacing
    # References that could not be programmed (stuck reference devices) are reported as failed.
    reference = tile.references.g.numpy()
    programmed = usable & ~shifted["failed"]
    assert np.all(np.abs(reference - result["symmetry_us"])[programmed] < 2 * spacing)
    beyond_noise = shifted.metadata.settings["tolerance_us"] + 6 * tile.read_noise_us
    far = usable & (np.abs(reference - result["symmetry_us"]) > beyond_noise)
    assert far.any()
    assert shifted["failed"][far].all()
    assert shifted.metadata.summary["programming_failures"] == int(shifted["failed"].sum())


def test_results_save_and_load_back(calibrated, tmp_path):
    _, result = calibrated
    path = result.save(tmp_path / "sp")
    loaded = CalibrationResult.load(path)
    assert loaded.metadata == result.metadata
    for name, values in result.arrays.items():
        assert np.array_equal(loaded[name], values, equal_nan=True)
    (tmp_path / "junk.npz").write_bytes(b"not a file")
    with pytest.raises(CimHilError, match="not a cim-hil calibration file"):
        CalibrationResult.load(tmp_path / "junk.npz")


def test_fit_recovers_generating_parameters_and_exports_an_emulator_config():
    config = make_config(device=dict(step_c2c=0.02, read_noise_levels=0.05, step_d2d=0.2), soc=dict(tiles=1, rows=32, cols=32))
    tile = build_emulator(config)[0]
    result = characterise(tile, progress=False)
    assert result.metadata.summary["fitted"] == 32 * 32
    for name, truth in (("a_up_us", tile.devices.a_up), ("a_down_us", tile.devices.a_down),
                        ("g_min_us", tile.devices.g_min), ("g_max_us", tile.devices.g_max)):
        relative = np.abs(result[name] - truth.numpy()) / truth.numpy()
        assert np.quantile(relative, 0.95) < 0.10, name  # stated tolerance: 10 % for 95 % of devices
    fitted = emulator_config_from_fit(result)
    assert fitted.device.step_up_us == pytest.approx(config.device.step_up_us, rel=0.1)
    assert fitted.device.g_max_us == pytest.approx(config.device.g_max_us, rel=0.05)
    assert fitted.device.step_d2d == pytest.approx(0.2, abs=0.05)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ConfigError, match="max_pairs"):
        from cim_hil.config import validate
        validate(SymmetrySearchConfig, {"max_pairs": 0})
    with pytest.raises(ConfigError, match="pulses"):
        from cim_hil.config import validate
        validate(CharacterisationConfig, {"pulses": 0})
    no_reference = build_emulator(make_config(periphery=dict(reference_devices=False), soc=dict(tiles=1, rows=8, cols=8)))[0]
    result = find_symmetry_points(no_reference, SymmetrySearchConfig(max_pairs=100), progress=False)
    with pytest.raises(CapabilityError, match="reference devices"):
        zero_shift(no_reference, result)


def test_budget_spent_before_convergence_flags_devices():
    tile = build_emulator(make_config(device=IMBALANCED, soc=dict(tiles=1, rows=8, cols=8)))[0]
    result = find_symmetry_points(tile, SymmetrySearchConfig(max_pairs=20, settle_blocks=5), progress=False)
    assert result["not_converged"].sum() == (~tile.devices.stuck).sum().item()
    assert np.isnan(result["symmetry_us"]).all()


def test_cli_calibrate_writes_results_and_plots(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cim_hil.cli", "calibrate", "symmetry", "--zero-shift", "--board", "emulator:?tiles=1&rows=16&cols=16",
         "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["symmetry_point"]["devices"] == 256
    assert {p.name for p in tmp_path.iterdir()} == {"symmetry_point.npz", "symmetry_point.png", "zero_shift.npz", "zero_shift.png"}
    bad = subprocess.run([sys.executable, "-m", "cim_hil.cli", "calibrate", "symmetry", "--tile", "9"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tile 9 does not exist" in bad.stderr and "Traceback" not in bad.stderr
