"""``cim-hil demo``: program a small pattern on one tile, run one batch of products, show the cost.

It speaks only the Tile/Board interface, so it sits in the core beside them.
"""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="program a tile, run products, print cycles and energy")
    demo.add_argument("--board", default="emulator:", help="board URL (default: emulator:)")
    demo.add_argument("--batch", type=int, default=4, help="samples in the product batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    """Program a small pattern, run one batch of products, show the result and what it cost."""
    import torch

    from cim_hil.board import open_board
    from cim_hil.errors import ConfigError
    from cim_hil.tile import Capability

    if args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")

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
