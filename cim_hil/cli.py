"""The ``cim-hil`` command. Every user error ends in one line on stderr, never a traceback.

This module is the top layer and holds only the wiring. Each command lives beside the package
it drives, in a module that offers ``register(subparsers)``: it adds its parser and sets
``run=<handler>`` (handler: ``args -> None``, raising a ``CimHilError`` for anything the user
got wrong). ``demo`` is in ``cim_hil/demo.py``, ``train`` in ``cim_hil/training/cli.py``, ``plan`` in ``cim_hil/nn/cli.py``,
``deploy`` in ``cim_hil/deploy/cli.py``,
``calibrate`` in ``calibration/cli.py``, ``board info`` and ``instruments list`` in
``drivers/cli.py``, ``board serve`` in ``drivers/simulators/cli.py``. To add a command, write
such a module in your package and add one ``register`` line to :func:`build_parser`. Handlers
import what they need inside the handler, so building the parser loads only the packages themselves.
"""

from __future__ import annotations

import argparse
import sys

from cim_hil.errors import CimHilError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _calibrate_references(tile):
    """Zero-shift one tile for training (imported when used: building the parser loads no torch)."""
    from calibration import calibrate_references

    return calibrate_references(tile)


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top, so that main() is already guarding against Ctrl-C while
    # the packages (and torch with them) load.
    import calibration.cli
    import cim_hil.demo
    import cim_hil.deploy.cli
    import cim_hil.nn.cli
    import cim_hil.training.cli
    import drivers.cli
    import drivers.simulators.cli

    parser = argparse.ArgumentParser(prog="cim-hil", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cim_hil.demo.register(commands)
    cim_hil.training.cli.register(commands, calibrate=_calibrate_references)
    cim_hil.nn.cli.register(commands)
    calibration.cli.register(commands)
    cim_hil.deploy.cli.register(commands)

    board = commands.add_parser("board", help="serve a virtual board, or ask a board what it is")
    board_commands = board.add_subparsers(dest="board_command", required=True)
    drivers.simulators.cli.register_board(board_commands)
    drivers.cli.register_board(board_commands)

    instruments = commands.add_parser("instruments", help="lab instruments over VISA")
    instruments_commands = instruments.add_subparsers(dest="instruments_command", required=True)
    drivers.cli.register_instruments(instruments_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except CimHilError as error:
        print(f"cim-hil: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("cim-hil: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
