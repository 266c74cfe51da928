"""The emulator against the physics and periphery of ../shared/DOMAIN.md."""

import json

import pytest
import torch

from cim_hil import open_board
from cim_hil.config import load_config
from cim_hil.emulator import build_emulator
from cim_hil.errors import CapabilityError, ConfigError, ShapeError, UnsafeValueError
from cim_hil.tile import Capability
from tests.conftest import IDEAL, make_config


def random_targets(spec, generator):
    return spec.g_min_us + (spec.g_max_us - spec.g_min_us) * torch.rand(spec.rows, spec.cols, generator=generator)


def test_ideal_products_equal_conductance_weighted_sums(ideal_config):
    tile = build_emulator(ideal_config)[0]
    g = torch.Generator().manual_seed(0)
    tile.program_verify(random_targets(tile.spec, g))
    tile.program_reference(random_targets(tile.spec, g))
    weights = tile.devices.g - tile.references.g
    x = torch.rand(16, 64, generator=g) * 2 - 1
    expected = tile.spec.v_read * x @ weights
    assert torch.allclose(tile.forward(x), expected, atol=1e-4)
    d = torch.rand(16, 64, generator=g) * 2 - 1
    assert torch.allclose(tile.backward(d), tile.spec.v_read * d @ weights.T, atol=1e-4)


def test_a_product_on_part_of_the_tile_drives_and_converts_only_that_part(ideal_config):
    tile = build_emulator(ideal_config)[0]
    g = torch.Generator().manual_seed(0)
    tile.program_verify(random_targets(tile.spec, g))
    x = torch.rand(16, 64, generator=g) * 2 - 1
    x[:, 25:] = 0  # undriven rows are held at 0 V
    start = tile.counters.cycles
    full = tile.forward(x)
    middle = tile.counters.cycles
    part = tile.forward(x[:, :25], outputs=6)
    assert torch.allclose(part, full[:, :6], atol=1e-4)
    # 8 columns share an ADC: all 64 outputs take 8 conversion phases per sample, 6 outputs 6.
    per_phase = tile.spec.input_bits + 1  # bit-serial input pulses, then one conversion
    assert (middle - start, tile.counters.cycles - middle) == (16 * 8 * per_phase, 16 * 6 * per_phase)
    assert torch.allclose(tile.backward(x[:, :6], outputs=30), tile.backward(torch.nn.functional.pad(x[:, :6], (0, 58)))[:, :30], atol=1e-4)
    # The products follow programming at once (the tile keeps G - G_ref between changes).
    tile.program_verify(torch.full((64, 64), tile.spec.g_max_us))
    assert torch.allclose(tile.forward(x), tile.spec.v_read * x @ (tile.devices.g - tile.references.g), atol=1e-4)


def test_inputs_are_quantised_to_dac_codes():
    config = make_config(**{**IDEAL, "periphery": {**IDEAL["periphery"], "input_bits": 3}})
    tile = build_emulator(config)[0]
    tile.program_verify(torch.full((64, 64), 20.0))
    tile.program_reference(torch.full((64, 64), 10.0))
    x = torch.zeros(1, 64)
    x[0, 0] = 0.4  # 3 bits: codes are multiples of 1/3, so 0.4 reads as 1/3
    y = tile.forward(x)
    assert torch.allclose(y, torch.full((1, 64), 0.1 * 10.0 / 3), atol=1e-4)


def test_adc_saturates_and_quantises():
    config = make_config(
        device=IDEAL["device"],
        periphery=dict(output_bits=4, adc_noise_levels=0.0, adc_full_scale_fraction=0.1),
    )
    tile = build_emulator(config)[0]
    tile.program_verify(torch.full((64, 64), 31.3))
    tile.program_reference(torch.full((64, 64), 7.6))
    full_scale = tile.forward_adc.full_scale
    lsb = full_scale / 7  # 4 bits, sign included: codes -7..7
    big = tile.forward(torch.ones(1, 64))
    assert torch.allclose(big, torch.full_like(big, full_scale))
    assert torch.allclose(tile.forward(-torch.ones(1, 64)), -big)
    small = tile.forward(torch.linspace(-0.01, 0.01, 64).repeat(3, 1))
    codes = small / lsb
    assert torch.allclose(codes, codes.round(), atol=1e-4)


def test_alternating_pulses_settle_at_analytic_symmetry_point():
    config = make_config(
        device=dict(step_up_us=2.0, step_down_us=0.8, step_d2d=0.3, step_c2c=0.0, read_noise_levels=0.0),
        soc=dict(rows=32, cols=32, tiles=1),
    )
    tile = build_emulator(config)[0]
    up = torch.ones(32, 32, dtype=torch.int64)
    for _ in range(300):
        tile.apply_pulses(up)
        tile.apply_pulses(-up)
    settled = tile.devices.g
    # Within one pulse step of G*, the steady-state wander the model allows.
    step = tile.devices.a_up * (tile.devices.g_max - settled) / (tile.devices.g_max - tile.devices.g_min)
    assert ((settled - tile.devices.symmetry_point()).abs() <= step).all()
    # And the asymmetric devices did move far from where they started.
    assert (settled - tile.devices.g_min).mean() > 5.0


def test_pulses_move_conductance_up_and_down_within_bounds(ideal_config):
    tile = build_emulator(ideal_config)[0]
    start = tile.devices.g.clone()
    tile.apply_pulses(torch.full((64, 64), 50, dtype=torch.int64))
    assert (tile.devices.g > start).all()
    assert (tile.devices.g <= tile.devices.g_max).all()
    high = tile.devices.g.clone()
    tile.apply_pulses(torch.full((64, 64), -3, dtype=torch.int64))
    assert (tile.devices.g < high).all()
    assert tile.counters.pulses == 64 * 64 * 53


def test_write_verify_reaches_targets_and_reports_failures():
    config = make_config(device=dict(stuck_fraction=0.05), soc=dict(tiles=1))
    tile = build_emulator(config)[0]
    targets = random_targets(tile.spec, torch.Generator().manual_seed(3))
    result = tile.program_verify(targets)
    ok = ~result.failed
    assert ((result.reached_us[ok] - targets[ok]).abs() <= result.tolerance_us).all()
    # A stuck device that misses its target by more than read noise can hide is always reported.
    beyond_noise = result.tolerance_us + 6 * tile.read_noise_us
    stuck_misses = tile.devices.stuck & ((tile.devices.g - targets).abs() > beyond_noise)
    assert stuck_misses.any()
    assert (result.failed[stuck_misses]).all()
    assert result.n_failed <= int(tile.devices.stuck.sum()) + 5
    assert (result.trials[result.failed] == config.write_verify.max_trials).all()


def test_write_verify_only_touches_masked_devices(ideal_config):
    tile = build_emulator(ideal_config)[0]
    before = tile.devices.g.clone()
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[3, 5] = True
    result = tile.program_verify(torch.full((64, 64), 25.0), mask=mask)
    changed = tile.devices.g != before
    assert changed[3, 5] and changed.sum() == 1
    assert result.n_attempted == 1 and torch.isnan(result.reached_us[0, 0])


def test_the_reference_chip_computes_gradients_on_the_host():
    assert not open_board("emulator:")[0].spec.supports(Capability.TRANSPOSE)
    assert open_board("emulator:?transpose=true")[0].spec.supports(Capability.TRANSPOSE)


def test_cycle_counts_follow_the_timing_model():
    board = open_board("emulator:?transpose=true")
    tile = board[0]
    tile.forward(torch.zeros(1, 64))
    assert tile.counters.cycles == 72  # 8 ADC phases x (8 input pulses + 1 conversion)
    tile.forward(torch.zeros(10, 64))
    assert tile.counters.cycles == 72 * 11
    tile.backward(torch.zeros(2, 64))
    assert tile.counters.cycles == 72 * 13
    assert tile.counters.seconds == pytest.approx(72 * 13 / 100e6)
    assert tile.counters.energy_nj == pytest.approx(13 * 2.66)
    before = tile.counters.cycles
    tile.read_conductances()
    assert tile.counters.cycles - before == 64 * (2 + 8 * 2)
    before = tile.counters.cycles
    counts = torch.zeros(64, 64, dtype=torch.int64)
    counts[0, 0], counts[0, 1], counts[5, 0] = 3, -2, 1
    tile.apply_pulses(counts)
    # Row 0: select + 3 SET + 2 RESET pulse slots; row 5: select + 1 slot; 10 cycles a pulse.
    assert tile.counters.cycles - before == 2 * 2 + (3 + 2 + 1) * 10
    assert board.counters.cycles == tile.counters.cycles


def test_same_seed_same_numbers_and_other_seed_differs():
    def run(url):
        tile = open_board(url)[0]
        tile.program_verify(torch.full((64, 64), 20.0))
        tile.apply_pulses(torch.ones(64, 64, dtype=torch.int64))
        x = torch.linspace(-1, 1, 64).repeat(4, 1)
        return torch.cat([tile.forward(x).flatten(), tile.read_conductances().flatten()])

    assert torch.equal(run("emulator:?seed=7"), run("emulator:?seed=7"))
    assert not torch.equal(run("emulator:?seed=7"), run("emulator:?seed=8"))


def test_geometry_is_overridable():
    board = open_board("emulator:?tiles=6&rows=128&cols=32")
    assert len(board) == 6 and board[5].spec.rows == 128 and board[5].spec.cols == 32
    assert board[0].forward(torch.zeros(2, 128)).shape == (2, 32)


@pytest.mark.parametrize(
    "sections, field",
    [
        (dict(device=dict(g_min_us=30.0, g_max_us=10.0)), "empty conductance range"),
        (dict(periphery=dict(input_bits=0)), "periphery.input_bits"),
        (dict(periphery=dict(output_bits=0)), "periphery.output_bits"),
        (dict(write_verify=dict(max_trials=-1)), "write_verify.max_trials"),
        (dict(write_verify=dict(max_pulses_per_call=-5)), "write_verify.max_pulses_per_call"),
        (dict(soc=dict(rows=0)), "soc.rows"),
        (dict(device=dict(levels=1)), "device.levels"),
        (dict(device=dict(colour="red")), "device.colour"),
    ],
)
def test_invalid_configurations_name_the_field(sections, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_config(**sections)


def test_config_files_load_and_bad_ones_name_file_and_field(tmp_path):
    good = tmp_path / "chip.toml"
    good.write_text("seed = 5\n[soc]\ntiles = 2\n[device]\nlevels = 32\n")
    config = load_config(good)
    assert config.soc.tiles == 2 and config.device.levels == 32 and config.seed == 5
    assert len(open_board(f"emulator:{good}")) == 2
    as_json = tmp_path / "chip.json"
    as_json.write_text(json.dumps({"periphery": {"input_bits": 0}}))
    with pytest.raises(ConfigError, match=r"chip\.json.*periphery\.input_bits"):
        load_config(as_json)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[soc\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_bad_calls_raise_clear_errors_and_leave_state_intact():
    tile = open_board("emulator:")[0]
    before = tile.devices.g.clone()
    with pytest.raises(ShapeError, match=r"1 <= k <= 64"):
        tile.forward(torch.zeros(2, 65))
    with pytest.raises(ShapeError, match="outputs"):
        tile.forward(torch.zeros(2, 64), outputs=0)
    with pytest.raises(ShapeError, match=r"\(64, 64\)"):
        tile.apply_pulses(torch.zeros(64, 65, dtype=torch.int64))
    with pytest.raises(ShapeError, match="integer"):
        tile.apply_pulses(torch.zeros(64, 64))
    with pytest.raises(UnsafeValueError, match="max_pulses_per_call"):
        tile.apply_pulses(torch.full((64, 64), 5000, dtype=torch.int64))
    targets = torch.full((64, 64), 20.0)
    targets[1, 1] = 80.0
    with pytest.raises(UnsafeValueError, match="safe conductance range"):
        tile.program_verify(targets)
    with pytest.raises(UnsafeValueError, match="max_trials"):
        tile.program_verify(torch.full((64, 64), 20.0), max_trials=0)
    with pytest.raises(ShapeError, match="window"):
        tile.read_conductances((0, 65, 0, 4))
    assert torch.equal(tile.devices.g, before)
    assert tile.counters.cycles == 0


def test_missing_capabilities_are_reported_not_faked():
    config = make_config(periphery=dict(transpose=False, reference_devices=False))
    tile = build_emulator(config)[0]
    with pytest.raises(CapabilityError, match="transpose"):
        tile.backward(torch.zeros(1, 64))
    with pytest.raises(CapabilityError, match="reference"):
        tile.read_reference()


def test_window_reads_return_the_window():
    tile = open_board("emulator:")[0]
    assert tile.read_conductances((2, 6, 10, 13)).shape == (4, 3)
    assert tile.counters.device_reads == 12
