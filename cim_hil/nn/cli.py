"""``cim-hil plan``, beside the planner it drives: where a model's layers would sit on a board's tiles, as a table and a picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from cim_hil.board import open_board
from cim_hil.errors import ConfigError
from cim_hil.nn.placement import fitting_host_layers, plan_placement, plot_placement

MODELS = {"lenet5": "cim_hil.training.lenet:lenet5"}


def register(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="place a model's layers on a board's tiles; print it, save a picture")
    plan.add_argument("--board", help="board URL whose tiles to plan for (default: as many 64x64 tiles as needed)")
    plan.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    plan.add_argument("--no-pack", action="store_true", help="one block per tile, as without packing")
    plan.add_argument("--host-layers", default="",
                      help="comma-separated layer names to keep on the host, or 'auto': the largest until the rest fits")
    plan.add_argument("--out", default="runs/plan.png", help="where to save the picture of the tiles")
    plan.set_defaults(run=run)


def build_model(name: str):
    module, _, function = MODELS[name].partition(":")
    return getattr(__import__(module, fromlist=[function]), function)()


def host_layers_from(text: str, model, rows: int, cols: int, tiles: int | None) -> tuple[str, ...]:
    """``--host-layers``: names, or ``auto`` (needs a board's tile count)."""
    if text != "auto":
        return tuple(name for name in text.split(",") if name)
    if tiles is None:
        raise ConfigError("--host-layers auto needs --board: it keeps layers on the host until the rest fits its tiles")
    return fitting_host_layers(model, rows, cols, tiles)


def picture_path(out: str) -> Path:
    """``--out`` checked before any planning: a file type matplotlib writes, named by its suffix."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(out)
    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in kinds:
        raise ConfigError(f"--out {out}: name the picture with one of the suffixes "
                          f"{', '.join('.' + kind for kind in sorted(kinds))} (say {path.with_suffix('.png')})")
    return path


def run(args: argparse.Namespace) -> None:
    out = picture_path(args.out)
    model = build_model(args.model)
    rows, cols, tiles, where = 64, 64, None, "the board"
    if args.board:
        with open_board(args.board) as board:
            spec, tiles, where = board[0].spec, len(board), f"the board at {board.url}"
            rows, cols = spec.rows, spec.cols
    host = host_layers_from(args.host_layers, model, rows, cols, tiles)
    placement = plan_placement(model, rows, cols, pack=not args.no_pack, host_layers=host, tiles=tiles, where=where)
    print(placement.describe())
    try:
        saved = plot_placement(placement, out)
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot save the picture there ({error.strerror or error}: "
                          f"{error.filename or out})") from None
    print(f"\npicture: {saved}")
