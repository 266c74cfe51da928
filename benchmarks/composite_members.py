"""Whether a composite board's members on separate links work at the same time.

    python benchmarks/composite_members.py [batch] [--baud 921600]

Two virtual boards, each a process of its own paced like a UART at ``--baud``, make one
composite board of two tiles. One batched product on both tiles (a group spanning the members)
is timed against the same product on each member's tile alone. If the members' requests run at
once, the composite takes about as long as the slower member, and ``overlap`` (the members'
times summed over the composite's) is near 2; one link after the other gives 1. Prints one
JSON object, each time the best of ``repeats``.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from cim_hil.board import open_board
from cim_hil.config import LinkConfig

sys.path.insert(0, str(Path(__file__).parent))
from _boards import serve  # noqa: E402
from _timing import best_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=int, nargs="?", default=256)
    parser.add_argument("--baud", type=int, default=921_600)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with ExitStack() as stack:
        urls = [serve(stack, tiles=1, baud=args.baud, seed=seed) for seed in range(2)]
        board = stack.enter_context(open_board("composite:" + "|".join(urls), LinkConfig(baudrate=args.baud)))
        x = torch.rand(2, args.batch, board[0].spec.rows, generator=torch.Generator().manual_seed(0)) * 2 - 1
        both = board.group([board[0], board[1]])
        alone = [board.group([board[i]]) for i in range(2)]
        seconds_both = best_seconds(lambda: both.forward(x), args.repeats, warmup=1)
        seconds_alone = [best_seconds(lambda i=i: alone[i].forward(x[i : i + 1]), args.repeats, warmup=1)
                         for i in range(2)]
    print(json.dumps({
        "baud": args.baud,
        "batch": args.batch,
        "seconds_member_0_alone": seconds_alone[0],
        "seconds_member_1_alone": seconds_alone[1],
        "seconds_both_members": seconds_both,
        "overlap": sum(seconds_alone) / seconds_both,
        "overlap_if_concurrent": 2.0,
    }, indent=2))


if __name__ == "__main__":
    main()
