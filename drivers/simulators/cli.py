"""``cim-hil board serve``: the virtual board as a command, beside the simulator it serves."""

from __future__ import annotations

import argparse


def register_board(board_commands: argparse._SubParsersAction) -> None:
    serve = board_commands.add_parser("serve", help="serve the emulator over the firmware protocol (pty or TCP)")
    serve.add_argument("--tcp", type=int, metavar="PORT", help="listen on 127.0.0.1:PORT (0: any) instead of a pty")
    serve.add_argument("--tiles", type=int, default=4)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--config", help="emulator TOML/JSON config (--tiles and --seed override it)")
    serve.add_argument("--pace-baud", type=int, help="pace the line like a UART at this baud rate")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    """Serve the emulator over the firmware protocol until Ctrl-C; prints where to connect."""
    from cim_hil.config import load_config
    from cim_hil.emulator.board import config_from_url
    from drivers.simulators.virtual_board import VirtualBoard

    config = load_config(args.config) if args.config else None
    config = config_from_url(f"emulator:?seed={args.seed}&tiles={args.tiles}", config)
    board = VirtualBoard(config, pace_baudrate=args.pace_baud)
    url = board.open_pty() if args.tcp is None else board.open_tcp(args.tcp)
    pacing = f", paced at {args.pace_baud} baud" if args.pace_baud else ""
    print(f"virtual board on {url} ({config.soc.tiles} tiles of {config.soc.rows}x{config.soc.cols}, "
          f"seed {config.seed}{pacing}); Ctrl-C stops it", flush=True)
    board.serve_forever()
