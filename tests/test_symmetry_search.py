"""The symmetry-point search against the emulator's known devices: stuck tiles, fine steps."""

import numpy as np
import pytest
import torch

from calibration import SymmetrySearchConfig, find_symmetry_points
from cim_hil.emulator import build_emulator
from tests.conftest import make_config


def test_a_mostly_stuck_tile_reports_no_stuck_device_as_converged():
    tile = build_emulator(make_config(device=dict(stuck_fraction=0.9), soc=dict(tiles=1, rows=32, cols=32), seed=3))[0]
    result = find_symmetry_points(tile, progress=False)
    stuck = tile.devices.stuck.numpy()
    assert stuck.sum() > 850
    assert np.isnan(result["symmetry_us"][stuck]).all()  # never converged, never averaged in
    assert np.array_equal(result["stuck"], stuck)  # and every working device found working
    summary = result.metadata.summary
    assert summary["stuck"] == stuck.sum() and summary["converged"] + summary["not_converged"] == (~stuck).sum()


def test_reads_alternate_after_up_and_down_pulses_so_the_estimate_is_unbiased():
    """On strongly imbalanced devices a read after a down pulse sits (1 - r) steps below G*;
    the search combines reads after up and after down pulses, so its mean error is a small
    fraction of a step."""
    device = dict(step_up_us=2.0, step_down_us=0.5, step_d2d=0.2, read_noise_levels=0.1, step_c2c=0.0)
    tile = build_emulator(make_config(device=device, soc=dict(tiles=1, rows=32, cols=32)))[0]
    result = find_symmetry_points(tile, SymmetrySearchConfig(reads_per_estimate=8, settle_blocks=40), progress=False)
    d = tile.devices
    truth = d.symmetry_point()
    step = d.a_up * (d.g_max - truth) / (d.g_max - d.g_min)
    error = (torch.from_numpy(result["symmetry_us"]) - truth) / step
    assert not error.isnan().any()
    assert abs(float(error.mean())) < 0.05  # a read after each down pulse alone: -0.2 steps
    assert float((error.abs() <= 1).float().mean()) >= 0.99
