"""open_board finds drivers through the cim_hil.boards entry points, by the URL's exact scheme,
and imports only the driver that scheme names."""

import subprocess
import sys

import pytest

from cim_hil.board import known_schemes, open_board, scheme_of
from cim_hil.errors import BoardError
from drivers.instrument_board import InstrumentBoardConfig
from drivers.simulators.scpi_simulator import SimulatedProbeStation

from .conftest import make_config


@pytest.mark.parametrize("url, scheme", [
    ("emulator:", "emulator"),
    ("emulator:?tiles=2&seed=3", "emulator"),
    ("emulator://board.toml", "emulator"),
    ("/dev/ttyUSB0", "serial"),
    ("/dev/pts/3", "serial"),
    ("COM3", "serial"),
    ("serial:/dev/ttyUSB0", "serial"),
    ("serial:socket://127.0.0.1:7000", "serial"),
    ("socket://127.0.0.1:7000", "socket"),
    ("rfc2217://10.0.0.2:4000", "rfc2217"),
    ("loop://", "loop"),
    ("TCPIP0::10.0.0.5::5025::SOCKET", "visa"),
    ("GPIB0::12::INSTR", "visa"),
    ("USB0::0x0957::0x8C18::MY51141234::INSTR", "visa"),
    ("ASRL1::INSTR", "visa"),
    ("visa:TCPIP0::10.0.0.5::5025::SOCKET", "visa"),
])
def test_each_url_form_has_one_scheme(url, scheme):
    assert scheme_of(url) == scheme


def test_the_package_declares_every_scheme_it_drives():
    assert set(known_schemes()) >= {"emulator", "serial", "socket", "rfc2217", "loop", "visa"}


def test_emulator_opens_without_loading_pyserial_or_pyvisa():
    script = ("import sys; from cim_hil.board import open_board; board = open_board('emulator:'); "
              "print(len(board), sorted(m for m in ('serial', 'pyvisa', 'pyvisa_py', 'drivers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "[]"]


def test_the_serial_scheme_loads_the_serial_driver_only():
    script = ("import sys; from cim_hil.board import open_board\n"
              "try:\n    open_board('/dev/ttyNOSUCHPORT')\nexcept Exception as e:\n    print(type(e).__name__)\n"
              "print('serial' in sys.modules, 'pyvisa' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["BoardError", "True", "False"], result.stderr


def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(BoardError, match=r"no driver for board URL 'nowhere:' \(scheme 'nowhere'\); known schemes: .*emulator.*serial"):
        open_board("nowhere:")


def test_a_scheme_is_matched_exactly_not_by_prefix():
    # By prefix, "serialx:" would reach the serial driver and "emulatorx:" the emulator.
    for url in ("serialx:/dev/ttyUSB0", "emulatorx:", "Emulator:"):
        with pytest.raises(BoardError, match="no driver for board URL"):
            open_board(url)


def test_text_without_a_scheme_is_refused_with_the_forms_it_could_take():
    with pytest.raises(BoardError, match="not a board URL: give a scheme"):
        open_board("ttyUSB0")


def test_visa_scheme_opens_the_same_board_as_the_bare_resource_name():
    array = make_config(soc=dict(tiles=1, rows=4, cols=4), periphery=dict(cols_per_adc=4), seed=5)
    with SimulatedProbeStation(array) as station:
        config = InstrumentBoardConfig(matrix_resource=station.matrix.server.resource_name, timeout_ms=300)
        bare = station.smu.server.resource_name
        with open_board(bare, config) as board:
            plain = board[0].read_conductances()
            assert board.info()["url"] == bare and board.info()["backend"] == "visa"
        with open_board(f"visa:{bare}", config) as board:
            assert board.info()["backend"] == "visa"
            assert board[0].read_conductances().shape == plain.shape == (4, 4)
