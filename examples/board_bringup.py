"""Bring up a board: connect, print what it reports, read a conductance map, save a picture.

    python examples/board_bringup.py [port-or-url] [tile]

With no port, a virtual board is started on a pseudo-terminal in this process and used
through the serial driver, exactly as a board on a USB-serial cable would be.
"""

import json
import sys
from pathlib import Path

from calibration.plots import plot_conductance_map
from cim_hil import open_board
from cim_hil.errors import CimHilError
from drivers.simulators.virtual_board import VirtualBoard

url = sys.argv[1] if len(sys.argv) > 1 else None
index = int(sys.argv[2]) if len(sys.argv) > 2 else 0
virtual = None
if url is None:
    virtual = VirtualBoard()
    url = virtual.open_pty()
    virtual.start()
    print(f"no port given: serving a virtual board on {url}")

try:
    with open_board(url) as board:
        print(json.dumps(board.info(), indent=2))
        conductance = board[index].read_conductances().numpy()
        out = Path("runs/bringup")
        out.mkdir(parents=True, exist_ok=True)
        picture = plot_conductance_map(conductance, out / f"tile{index}_conductance", f"tile {index} on {url}")
        print(f"tile {index}: {conductance.min():.2f} .. {conductance.max():.2f} uS, "
              f"mean {conductance.mean():.2f} uS; map saved to {picture}")
        print("link:", json.dumps(board.link.stats.as_dict()) if hasattr(board, "link") else "in-process")
except CimHilError as error:  # a missing port or a silent board: one clear line
    sys.exit(f"board_bringup: {error}")
finally:
    if virtual is not None:
        virtual.stop()
