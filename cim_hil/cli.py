"""The ``cim-hil`` command. Every user error ends in one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from cim_hil.board import open_board
from cim_hil.errors import CimHilError
from cim_hil.nn.plan_command import add_parser as add_plan_parser
from cim_hil.tile import Capability

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _demo(args: argparse.Namespace) -> None:
    """Program a small pattern, run one batch of products, show the result and what it cost."""
    with open_board(args.board) as board:
        tile = board[0]
        spec = tile.spec
        generator = torch.Generator().manual_seed(args.seed)
        middle = (spec.g_min_us + spec.g_max_us) / 2
        if tile.spec.supports(Capability.REFERENCE):
            tile.program_reference(torch.full((spec.rows, spec.cols), middle))
        targets = spec.g_min_us + (spec.g_max_us - spec.g_min_us) * torch.rand(
            spec.rows, spec.cols, generator=generator
        )
        result = tile.program_verify(targets)
        before = tile.counters.cycles
        x = torch.rand(args.batch, spec.rows, generator=generator) * 2 - 1
        y = tile.forward(x)
        cycles = tile.counters.cycles - before
        report = {
            "board": board.info(),
            "programmed_devices": result.n_attempted,
            "programming_failures": result.n_failed,
            "first_outputs_uA": [round(v, 4) for v in y[0, :8].tolist()],
            "product_cycles": cycles,
            "product_cycles_per_sample": cycles // args.batch,
            "product_seconds": cycles / tile.counters.clock_hz,
            "board_counters": board.counters.as_dict(),
        }
        print(json.dumps(report, indent=2))


def _train(args: argparse.Namespace) -> None:
    """Train LeNet-5 on MNIST (mixed precision on the emulator by default); resume with --resume."""
    from cim_hil.config import load_config, validate
    from cim_hil.training import TrainConfig, Trainer
    from cim_hil.training.mnist import load_mnist

    base = load_config(args.config, TrainConfig).model_dump() if args.config else {}
    flags = {
        "board": args.board,
        "float_baseline": args.float_baseline or None,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rule": args.rule,
        "seed": args.seed,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "pack": args.pack,
        "host_layers": None if args.host_layers is None else (
            "auto" if args.host_layers == "auto" else [name for name in args.host_layers.split(",") if name]),
    }
    config = validate(TrainConfig, {**base, **{k: v for k, v in flags.items() if v is not None}})
    data = load_mnist(args.data_dir, download_missing=args.download, seed=config.seed)
    print(f"data: {data.source}", file=sys.stderr)
    progress = not args.no_progress
    if args.resume:
        trainer = Trainer.resume(args.out, data, progress)
        print(f"resuming {args.out} after epoch {trainer.epoch}", file=sys.stderr)
    else:
        trainer = Trainer(config, data, args.out, progress)
    if trainer.placement is not None:
        print(f"placement: {trainer.placement.summary()} (in {args.out}/placement.json)", file=sys.stderr)
    history = trainer.fit(args.epochs)
    summary = {"out": str(args.out), "epochs": trainer.epoch, **(history[-1] if history else {})}
    if trainer.board is not None:
        summary["board"] = trainer.board.info()
    print(json.dumps(summary, indent=2))


def _calibrate(args: argparse.Namespace) -> None:
    """Symmetry point (+ zero-shift) or characterisation of one tile; results, plots, summary."""
    from pathlib import Path

    from calibration import characterise, emulator_config_from_fit, find_symmetry_points, zero_shift
    from calibration.plots import plot_pulse_response, plot_residual, plot_symmetry
    from cim_hil.errors import ConfigError

    out = Path(args.out)
    with open_board(args.board) as board:
        if not 0 <= args.tile < len(board):
            raise ConfigError(f"--tile {args.tile} does not exist; the board has tiles 0..{len(board) - 1}")
        tile, info = board[args.tile], board.info()
        progress = not args.no_progress
        written = []
        if args.what == "symmetry":
            result = find_symmetry_points(tile, progress=progress, tile_index=args.tile, board_info=info)
            written += [result.save(out / "symmetry_point"), plot_symmetry(result, out / "symmetry_point")]
            summary = {"symmetry_point": result.metadata.summary}
            if args.zero_shift:
                shifted = zero_shift(tile, result, tile_index=args.tile, board_info=info)
                written += [shifted.save(out / "zero_shift"), plot_residual(shifted, out / "zero_shift")]
                summary["zero_shift"] = shifted.metadata.summary
        else:
            result = characterise(tile, progress=progress, tile_index=args.tile, board_info=info)
            written += [result.save(out / "characterisation"), plot_pulse_response(result, out / "characterisation")]
            fitted = out / "fitted_emulator.json"
            fitted.write_text(emulator_config_from_fit(result).model_dump_json(indent=2))
            written.append(fitted)
            summary = {"characterisation": result.metadata.summary}
    print(json.dumps({**summary, "files": [str(p) for p in written]}, indent=2))


def _board_serve(args: argparse.Namespace) -> None:
    """Serve the emulator over the firmware protocol until Ctrl-C; prints where to connect."""
    from cim_hil.config import load_config
    from cim_hil.emulator.board import config_from_url
    from drivers.virtual_board import VirtualBoard

    config = load_config(args.config) if args.config else None
    config = config_from_url(f"emulator:?seed={args.seed}&tiles={args.tiles}", config)
    board = VirtualBoard(config, pace_baudrate=args.pace_baud)
    url = board.open_pty() if args.tcp is None else board.open_tcp(args.tcp)
    pacing = f", paced at {args.pace_baud} baud" if args.pace_baud else ""
    print(f"virtual board on {url} ({config.soc.tiles} tiles of {config.soc.rows}x{config.soc.cols}, "
          f"seed {config.seed}{pacing}); Ctrl-C stops it", flush=True)
    board.serve_forever()


def _board_info(args: argparse.Namespace) -> None:
    """Connect, say HELLO, print what the board reports and what the link carried."""
    with open_board(args.url) as board:
        print(json.dumps(board.info(), indent=2))


def _instruments_list(args: argparse.Namespace) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cim-hil", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="program a tile, run products, print cycles and energy")
    demo.add_argument("--board", default="emulator:", help="board URL (default: emulator:)")
    demo.add_argument("--batch", type=int, default=4, help="samples in the product batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train LeNet-5 on MNIST on the emulator (or a board)")
    train.add_argument("--board", help="board URL (default: the emulator with as many tiles as LeNet needs)")
    train.add_argument("--float", dest="float_baseline", action="store_true", help="float32 baseline on the host")
    train.add_argument("--epochs", type=int, help="train up to this many epochs in total (default 3)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--rule", choices=["sgd", "adam"])
    train.add_argument("--seed", type=int)
    train.add_argument("--train-limit", type=int, help="use only the first N training digits")
    train.add_argument("--test-limit", type=int, help="use only the first N test digits")
    train.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                       help="pack small blocks side by side on tiles (default: only when needed to fit the board)")
    train.add_argument("--host-layers", help="comma-separated layers to keep on the host (see cim-hil plan), or "
                       "'auto': the largest until the rest fits the board")
    train.add_argument("--config", help="TOML/JSON file with TrainConfig fields (flags override it)")
    train.add_argument("--data-dir", help="directory with the MNIST IDX files (default: offline data)")
    train.add_argument("--download", action="store_true", help="download the IDX files into --data-dir")
    train.add_argument("--out", default="runs/lenet", help="run directory: metrics, curves, checkpoint")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=_train)

    add_plan_parser(commands)

    calibrate = commands.add_parser("calibrate", help="symmetry point, zero-shift or characterisation of a tile")
    calibrate.add_argument("what", choices=["symmetry", "characterise"])
    calibrate.add_argument("--board", default="emulator:", help="board URL (default: emulator:)")
    calibrate.add_argument("--tile", type=int, default=0)
    calibrate.add_argument("--zero-shift", action="store_true", help="after the symmetry search, program the references")
    calibrate.add_argument("--out", default="runs/calibration", help="directory for results and plots")
    calibrate.add_argument("--no-progress", action="store_true")
    calibrate.set_defaults(run=_calibrate)

    board = commands.add_parser("board", help="serve a virtual board, or ask a board what it is")
    board_commands = board.add_subparsers(dest="board_command", required=True)
    serve = board_commands.add_parser("serve", help="serve the emulator over the firmware protocol (pty or TCP)")
    serve.add_argument("--tcp", type=int, metavar="PORT", help="listen on 127.0.0.1:PORT (0: any) instead of a pty")
    serve.add_argument("--tiles", type=int, default=4)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--config", help="emulator TOML/JSON config (--tiles and --seed override it)")
    serve.add_argument("--pace-baud", type=int, help="pace the line like a UART at this baud rate")
    serve.set_defaults(run=_board_serve)
    info = board_commands.add_parser("info", help="connect to a board and print its INFO and link figures")
    info.add_argument("url", help="serial port path or pyserial URL (socket://host:port, ...), or emulator:")
    info.set_defaults(run=_board_info)

    instruments = commands.add_parser("instruments", help="lab instruments over VISA")
    instruments_commands = instruments.add_subparsers(dest="instruments_command", required=True)
    listing = instruments_commands.add_parser("list", help="list the VISA resources found")
    listing.add_argument("--library", default="@py", help="pyvisa backend: @py (default), file.yaml@sim, or a VISA path")
    listing.add_argument("--identify", action="store_true", help="ask each resource for *IDN?")
    listing.set_defaults(run=_instruments_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
