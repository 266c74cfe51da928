"""``cim-hil calibrate``: its arguments and its handler, beside the calibrations they run."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    calibrate = commands.add_parser("calibrate", help="symmetry point, zero-shift or characterisation of a tile")
    calibrate.add_argument("what", choices=["symmetry", "characterise"])
    calibrate.add_argument("--board", default="emulator:", help="board URL (default: emulator:)")
    calibrate.add_argument("--tile", type=int, default=0)
    calibrate.add_argument("--zero-shift", action="store_true", help="after the symmetry search, program the references")
    calibrate.add_argument("--out", default="runs/calibration", help="directory for results and plots")
    calibrate.add_argument("--no-progress", action="store_true")
    calibrate.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> None:
    """Symmetry point (+ zero-shift) or characterisation of one tile; results, plots, summary."""
    from pathlib import Path

    from calibration import characterise, emulator_config_from_fit, find_symmetry_points, zero_shift
    from calibration.plots import plot_pulse_response, plot_residual, plot_symmetry
    from cim_hil.board import open_board
    from cim_hil.errors import ConfigError

    out = Path(args.out)
    _check_writable(out)  # before any device is pulsed or programmed
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


def _check_writable(out) -> None:
    """Refuse an --out that is a file or cannot be written, creating it if need be."""
    from cim_hil.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {out} cannot be written: {error.strerror or error}") from None
