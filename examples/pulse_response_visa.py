"""Measure pulse-response curves of a small crossbar through VISA, fit them, save a plot.

    python examples/pulse_response_visa.py [SMU-resource MATRIX-resource]

With no resources, a simulated probe station (a Keysight B2900-style SMU and an E5250A-style
switch matrix on loopback sockets, backed by the emulator's device physics) is started here
and reached through pyvisa-py exactly as LAN instruments would be.
"""

import sys

from calibration import CharacterisationConfig, characterise
from calibration.plots import plot_pulse_response
from cim_hil import open_board
from cim_hil.config import EmulatorConfig
from cim_hil.errors import CimHilError
from drivers.instrument_board import InstrumentBoardConfig
from drivers.simulators.scpi_simulator import SimulatedProbeStation

station = None
if len(sys.argv) >= 3:
    smu, matrix = sys.argv[1:3]
else:
    station = SimulatedProbeStation(EmulatorConfig(soc=dict(tiles=1, rows=4, cols=4), periphery=dict(cols_per_adc=4)))
    smu, matrix = station.smu.server.resource_name, station.matrix.server.resource_name
    print(f"no instruments given: simulated SMU at {smu}, switch matrix at {matrix}")

try:
    with open_board(smu, InstrumentBoardConfig(matrix_resource=matrix)) as board:
        print("instruments:", board.info()["smu"], "/", board.info()["matrix"])
        result = characterise(board[0], CharacterisationConfig(pulses=30, reads=1, reset_pulses=60),
                              board_info=board.info())
        print("fit:", result.metadata.summary)
        print("wrote", result.save("runs/visa-pulse-response/result"),
              plot_pulse_response(result, "runs/visa-pulse-response/curves"))
except CimHilError as error:
    sys.exit(f"pulse_response_visa: {error}")
finally:
    if station is not None:
        station.close()
