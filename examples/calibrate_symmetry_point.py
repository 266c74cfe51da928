"""Find every device's symmetry point on one tile, zero-shift its references, save and plot.

    python examples/calibrate_symmetry_point.py [board-url] [tile]

Uses only the Tile interface, so any board URL works; the default is the emulator with
strongly asymmetric devices, where the symmetry points sit well away from mid-range.
"""

import sys

from calibration import find_symmetry_points, zero_shift
from calibration.plots import plot_residual, plot_symmetry
from cim_hil import open_board
from cim_hil.config import EmulatorConfig, validate

url = sys.argv[1] if len(sys.argv) > 1 else "emulator:"
index = int(sys.argv[2]) if len(sys.argv) > 2 else 0
asymmetric = validate(EmulatorConfig, {"device": {"step_up_us": 2.0, "step_down_us": 0.6}})

with open_board(url, asymmetric) as board:
    tile = board[index]
    found = find_symmetry_points(tile, tile_index=index, board_info=board.info())
    print("symmetry point:", found.metadata.summary)
    shifted = zero_shift(tile, found, tile_index=index, board_info=board.info())
    print("zero-shift:", shifted.metadata.summary)
    for result, name, plot in ((found, "symmetry_point", plot_symmetry), (shifted, "zero_shift", plot_residual)):
        print("wrote", result.save(f"runs/example-calibration/{name}"), plot(result, f"runs/example-calibration/{name}"))
