"""How much of the serial line the protocol turns into payload, over a real pty.

A virtual board paced like a UART at 921600 baud (8N1: 10 bits per byte, 92,160 bytes/s each
way) serves the emulator on a pseudo-terminal; the serial driver reads whole conductance maps
and runs batched products through it. Payload bytes per second count the message payloads
both ways (request and reply) over the wall time of the request; ``*_line_fraction`` divides
that by the one-way line rate, the most a stop-and-wait link can reach. ``*_chip_seconds`` is
what the emulated array itself spent on the same work: the gap is the link's.

    python benchmarks/link.py [repeats]
"""

import json
import sys
import time

import torch

from cim_hil import open_board
from cim_hil.config import LinkConfig
from drivers.simulators.virtual_board import VirtualBoard

BAUD = 921600
LINE_BYTES_PER_S = BAUD / 10
BATCH = 1024


def measure(board, work, repeats: int) -> tuple[float, float, float]:
    """Best wall seconds of one ``work()``, its payload bytes, and the chip seconds it took."""
    best, payload, chip = float("inf"), 0, 0.0
    for _ in range(repeats):
        stats, before = board.link.stats, board[0].counters.seconds
        sent, received = stats.payload_bytes_out, stats.payload_bytes_in
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
        payload = stats.payload_bytes_out - sent + stats.payload_bytes_in - received
        chip = board[0].counters.seconds - before
    return best, payload, chip


def main(repeats: int) -> dict:
    virtual = VirtualBoard(pace_baudrate=BAUD)
    url = virtual.open_pty()
    virtual.start()
    try:
        with open_board(url, LinkConfig(baudrate=BAUD)) as board:
            tile = board[0]
            x = torch.rand(BATCH, tile.spec.rows, generator=torch.Generator().manual_seed(0)) * 2 - 1
            map_s, map_bytes, map_chip = measure(board, tile.read_conductances, repeats)
            products_s, products_bytes, products_chip = measure(board, lambda: tile.forward(x), repeats)
            stats = board.link.stats.as_dict()
    finally:
        virtual.stop()
    return {
        "baudrate": BAUD,
        "line_bytes_per_s": LINE_BYTES_PER_S,
        "map_read_payload_bytes": map_bytes,
        "map_read_s": map_s,
        "map_read_payload_bytes_per_s": map_bytes / map_s,
        "map_read_line_fraction": map_bytes / map_s / LINE_BYTES_PER_S,
        "map_read_chip_seconds": map_chip,
        "products_batch": BATCH,
        "products_payload_bytes": products_bytes,
        "products_s": products_s,
        "products_payload_bytes_per_s": products_bytes / products_s,
        "products_line_fraction": products_bytes / products_s / LINE_BYTES_PER_S,
        "products_chip_seconds": products_chip,
        "retries": stats["retries"],
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5), indent=2))
