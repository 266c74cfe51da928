"""VISA instrument drivers: command level against pyvisa-sim, end to end against the loopback
SCPI simulator over pyvisa-py and a real TCP socket."""

from pathlib import Path

import pytest
import pyvisa
import torch

from calibration import find_symmetry_points
from cim_hil.board import open_board
from cim_hil.cli import main
from cim_hil.errors import BoardError, CapabilityError, ConfigError, UnsafeValueError
from cim_hil.nn import MappingConfig, convert_to_analog
from drivers.instrument_board import InstrumentBoardConfig
from drivers.instruments import Keithley2400Graphical, KeysightB2900, SafetyLimits, SwitchMatrix, open_smu
from drivers.simulators.scpi_simulator import SimulatedProbeStation

from .conftest import make_config

SIM = str(Path(__file__).parent / "instruments" / "sim.yaml") + "@sim"
B2902A, K2450, E5250A, SCOPE = (f"TCPIP0::192.0.2.{n}::inst0::INSTR" for n in (10, 11, 12, 13))
ARRAY = make_config(soc=dict(tiles=1, rows=4, cols=4), periphery=dict(cols_per_adc=4), seed=5,
                    device=dict(step_up_us=2.0, step_down_us=0.6))


@pytest.fixture
def manager():
    return pyvisa.ResourceManager(SIM)


# ---- command level: pyvisa-sim --------------------------------------------------------------
@pytest.mark.parametrize("resource, driver, current, amplitude", [(B2902A, KeysightB2900, 2e-6, 1.2),
                                                                  (K2450, Keithley2400Graphical, 1.5e-6, -1.2)])
def test_smu_drivers_send_their_families_commands(manager, resource, driver, current, amplitude):
    smu = open_smu(manager, resource, SafetyLimits(), timeout_ms=500)
    assert type(smu) is driver
    assert smu.measure_current(0.1, 1e-4) == current
    smu.pulse(amplitude, 100e-6, 3, 5e-4)
    # Any command the simulator does not list would have queued "ERROR" for this query.
    assert smu.query("*OPC?") == "1"


def test_switch_matrix_routes_row_and_column(manager):
    matrix = SwitchMatrix(manager.open_resource(E5250A), rows=4, cols=4)
    matrix.connect(1, 2)
    matrix.connect(1, 2)  # already routed: nothing sent
    assert matrix.query("*OPC?") == "1" and matrix.connected == (1, 2)
    with pytest.raises(UnsafeValueError, match="outside the 4x4 array"):
        matrix.connect(4, 0)


def test_wrong_instrument_is_refused_by_its_idn(manager):
    with pytest.raises(BoardError, match="TEKTRONIX DPO4104, not a source-measure unit"):
        open_smu(manager, SCOPE, SafetyLimits(), timeout_ms=500)
    with pytest.raises(BoardError, match="not a switch matrix"):
        SwitchMatrix(manager.open_resource(B2902A), rows=4, cols=4)


# ---- end to end: loopback SCPI simulator over pyvisa-py and TCP -------------------------------
@pytest.fixture
def station():
    with SimulatedProbeStation(ARRAY) as station:
        yield station


def board_config(station, **overrides):
    return InstrumentBoardConfig(matrix_resource=station.matrix.server.resource_name, timeout_ms=300, **overrides)


def test_symmetry_point_calibration_of_a_4x4_array_through_visa(station):
    with open_board(station.smu.server.resource_name, board_config(station)) as board:
        result = find_symmetry_points(board[0], progress=False, board_info=board.info())
    devices = station.crossbar.devices
    truth = devices.symmetry_point()
    step = devices.a_up * (devices.g_max - truth) / (devices.g_max - devices.g_min)
    estimate = torch.from_numpy(result["symmetry_us"])
    assert ((estimate - truth).abs() <= step).all(), (estimate, truth, step)
    assert result.metadata.board["backend"] == "visa"
    assert station.crossbar.pulses_applied >= 16 * result.metadata.summary["pairs_per_device"] * 2


def test_unsafe_commands_are_refused_before_anything_is_sent(station):
    limits = SafetyLimits(max_voltage_v=1.5, max_compliance_a=1e-3, min_pulse_width_s=50e-6, max_pulse_width_s=1e-3)
    with open_board(station.smu.server.resource_name, board_config(station, limits=limits)) as board:
        smu = board[0].smu
        sent = len(station.smu.server.received)
        for call, limit in [
            (lambda: smu.pulse(3.0, 100e-6, 1, 1e-4), "max_voltage_v = 1.5"),
            (lambda: smu.pulse(-1.0, 10e-6, 1, 1e-4), "min_pulse_width_s"),
            (lambda: smu.pulse(1.0, 100e-6, 1, 5e-3), "max_compliance_a"),
            (lambda: smu.measure_current(float("nan"), 1e-4), "max_voltage_v"),
        ]:
            with pytest.raises(UnsafeValueError, match=limit):
                call()
        assert len(station.smu.server.received) == sent  # nothing went on the wire
    over = board_config(station, set_voltage_v=2.5)  # the tile's own pulses are checked the same way
    with open_board(station.smu.server.resource_name, over) as board:
        sent = len(station.smu.server.received)
        with pytest.raises(UnsafeValueError, match="pulse amplitude 2.5 V exceeds the safety limit max_voltage_v"):
            board[0].apply_pulses(torch.ones(4, 4, dtype=torch.int64))
        assert len(station.smu.server.received) == sent
        assert station.crossbar.pulses_applied == 0


def test_an_instrument_that_stops_answering_is_named(station):
    with open_board(station.smu.server.resource_name, board_config(station)) as board:
        board[0].read_conductances()
        station.smu.server.mute = True
        with pytest.raises(BoardError, match=f"instrument {station.smu.server.resource_name} did not answer"):
            board[0].read_conductances()


def test_products_are_computed_and_say_so(station):
    with open_board(station.smu.server.resource_name, board_config(station)) as board:
        tile = board[0]
        assert "computed_products" in board.info()["capabilities"] and "analog_products" not in board.info()["capabilities"]
        x = torch.rand(3, 4) * 2 - 1
        expected = 0.1 * x @ (station.crossbar.devices.g - tile.reference_us)
        assert torch.allclose(tile.forward(x), expected, atol=0.1 * 4 * 4 * 0.5)
        with pytest.raises(CapabilityError, match="analog_products"):
            convert_to_analog(torch.nn.Sequential(torch.nn.Linear(4, 4)), board, MappingConfig())
        result = tile.program_verify(torch.full((4, 4), 15.0), tolerance_us=1.0)
        assert result.n_failed == 0 and (station.crossbar.devices.g - 15.0).abs().max() < 1.0 + 1.5


def test_instrument_board_needs_its_config_and_a_reachable_resource(station):
    with pytest.raises(ConfigError, match="needs an InstrumentBoardConfig"):
        open_board(station.smu.server.resource_name)
    with pytest.raises(BoardError, match="TCPIP0::127.0.0.1::1::SOCKET"):
        open_board("TCPIP0::127.0.0.1::1::SOCKET", board_config(station))


def test_cli_lists_visa_resources(capsys):
    assert main(["instruments", "list", "--library", SIM, "--identify"]) == 0
    out = capsys.readouterr().out
    assert B2902A in out and "B2902A" in out and "E5250A" in out
