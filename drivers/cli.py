"""``cim-hil board info`` and ``cim-hil instruments list``: commands beside the drivers they use."""

from __future__ import annotations

import argparse
import json
import warnings


def register_board(board_commands: argparse._SubParsersAction) -> None:
    info = board_commands.add_parser("info", help="connect to a board and print its INFO and link figures")
    info.add_argument("url", help="serial port path or pyserial URL (socket://host:port, ...), or emulator:")
    info.set_defaults(run=run_board_info)


def register_instruments(instruments_commands: argparse._SubParsersAction) -> None:
    listing = instruments_commands.add_parser("list", help="list the VISA resources found")
    listing.add_argument("--library", default="@py", help="pyvisa backend: @py (default), file.yaml@sim, or a VISA path")
    listing.add_argument("--identify", action="store_true", help="ask each resource for *IDN?")
    listing.set_defaults(run=run_instruments_list)


def run_board_info(args: argparse.Namespace) -> None:
    """Connect, say HELLO, print what the board reports and what the link carried."""
    from cim_hil.board import open_board

    with open_board(args.url) as board:
        print(json.dumps(board.info(), indent=2))


def run_instruments_list(args: argparse.Namespace) -> None:
    """The VISA resources the chosen backend finds, with their *IDN? when asked."""
    import pyvisa

    from cim_hil.errors import BoardError
    from drivers.instruments import identify

    try:
        manager = pyvisa.ResourceManager(args.library)
        with warnings.catch_warnings():  # pyvisa-py suggests optional discovery packages: advice, not errors
            warnings.simplefilter("ignore", UserWarning)
            resources = manager.list_resources()
    except (OSError, ValueError, pyvisa.Error) as error:
        raise BoardError(f"cannot list VISA resources with {args.library!r}: {error}") from None
    if not resources:
        print(f"no VISA resources found with {args.library!r} (LAN instruments on raw sockets are not "
              "discoverable: give their TCPIP0::host::port::SOCKET name directly)")
    for name in resources:
        if not args.identify:
            print(name)
            continue
        try:
            resource = manager.open_resource(name)
            resource.timeout = 1000
            identity = identify(resource)
            print(f"{name}  {identity.maker} {identity.model} ({identity.serial})")
        except (BoardError, pyvisa.Error, OSError) as error:
            print(f"{name}  (no answer to *IDN?: {error})")
