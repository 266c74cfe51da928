"""Data-parallel LeNet training over paced serial links: 1 rank against 2, each on its own board.

    python benchmarks/data_parallel.py [samples_per_rank] [--baud 921600]

Each rank drives its own virtual board (a process of its own serving the emulator over a
loopback socket, paced like a UART at ``--baud``), so the link is the bottleneck and two ranks
should train about twice the samples per second of one. Prints one JSON object: samples per
second (the epoch's training loop, programming the initial weights excluded) with 1 and 2
ranks, their ratio ``speedup_2``, the test accuracy of each short run, and the tiles LeNet
takes on 64x64 tiles packed beside one block per tile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from cim_hil.config import LinkConfig
from cim_hil.nn.placement import plan_placement
from cim_hil.training import TrainConfig
from cim_hil.training.distributed import spawn_ranks
from cim_hil.training.lenet import lenet5
from cim_hil.training.mnist import load_mnist

sys.path.insert(0, str(Path(__file__).parent))
from _boards import serve  # noqa: E402

BATCH = 16
TEST_PER_RANK = 40
# The emulator behind a virtual board computes a whole model's first write-verify far slower than a
# chip would (seconds on a busy machine); the link waits that long for the answer.
LINK_PATIENCE_S = 30.0


def run(ranks: int, samples_per_rank: int, baud: int, tiles: int, data) -> dict:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as out:
        urls = [serve(stack, tiles, baud, seed=rank) for rank in range(ranks)]
        config = TrainConfig(epochs=1, batch_size=BATCH, train_limit=samples_per_rank * ranks,
                             test_limit=TEST_PER_RANK * ranks, rank_boards=urls, pack=False,
                             distributed_timeout_s=600, link=LinkConfig(baudrate=baud, response_timeout_s=LINK_PATIENCE_S))
        summary = spawn_ranks(config, data, out, ranks, progress=False)
    samples = summary["train_samples"] if ranks > 1 else samples_per_rank
    return {
        "samples": samples,
        "train_seconds": summary["train_seconds"],
        "samples_per_second": samples / summary["train_seconds"],
        "test_acc": summary["test_acc"],
        "test_samples": TEST_PER_RANK * ranks,
        "host_threads_per_rank": summary["host_threads"],
        # The epoch's wire traffic per digit, every rank's summed: the write-verify traffic
        # depends on the gradients, so an averaged gradient over more digits can move more
        # devices per step (each rank programs the same ones).
        "link_bytes_per_sample": (summary["link_bytes_out"] + summary["link_bytes_in"]) / samples,
        "devices_programmed_per_rank": summary["devices_programmed"],
        "link_bytes_rank0": summary["board"]["link"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples_per_rank", type=int, nargs="?", default=64)
    parser.add_argument("--baud", type=int, default=921_600)
    args = parser.parse_args()
    model = lenet5()
    unpacked = plan_placement(model, 64, 64, pack=False).tiles_used
    packed = plan_placement(model, 64, 64, pack=True).tiles_used
    data = load_mnist(None)
    one = run(1, args.samples_per_rank, args.baud, unpacked, data)
    two = run(2, args.samples_per_rank, args.baud, unpacked, data)
    print(json.dumps({
        "baud": args.baud,
        "batch_per_rank": BATCH,
        "samples_per_second_1": one["samples_per_second"],
        "samples_per_second_2": two["samples_per_second"],
        "speedup_2": two["samples_per_second"] / one["samples_per_second"],
        "speedup_target": 1.8,
        "test_acc_1": one["test_acc"],
        "test_acc_2": two["test_acc"],
        "tiles_needed_unpacked": unpacked,
        "tiles_needed_packed": packed,
        "runs": {"1": one, "2": two},
    }, indent=2))


if __name__ == "__main__":
    main()
