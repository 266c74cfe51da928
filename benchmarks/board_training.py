"""What training LeNet on a board costs on its serial line, against what the host needs.

Two runs of the same training, in this process, with the same seed: ``cim-hil train``'s
trainer on the in-process emulator, and on a virtual board (the same emulator behind the
firmware protocol) on a pseudo-terminal paced like a UART at 921,600 baud (92,160 bytes/s each
way). Each trains a fixed number of steps and evaluates a fixed number of test digits.

- ``same_numbers``: both runs gave identical losses, test accuracy and final conductances
  (weight and reference devices of every tile).
- ``bytes_per_training_sample`` / ``bytes_per_test_sample``: wire bytes both ways (frames,
  COBS and CRC included) of the training pass / test pass, per digit. The initial programming
  of the model onto the board is one-off and reported apart.
- ``bound_bytes_per_training_sample``: what the host's backward pass needs from the board per
  digit, the image (one byte per pixel) plus every analog layer's output codes (one byte per
  code); ``ratio_to_bound`` divides the first by it.
- ``link_s_per_epoch`` / ``chip_s_per_epoch``: the training pass's seconds on the link (wall
  time waiting on requests) and of the emulated chip (its cycle counters), per digit, times the
  5,000 digits of the offline split's epoch.

    python benchmarks/board_training.py [steps] [test_digits]
"""

import json
import sys
import tempfile
import time

import torch

from cim_hil.config import EmulatorConfig, SoCConfig
from cim_hil.nn import analog_layers
from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist
from drivers.simulators.virtual_board import VirtualBoard

BAUD = 921600
EPOCH_DIGITS = 5000
BATCH = 32
TILES = 18  # LeNet-5 on 64x64 tiles, one block per tile (what `cim-hil train` gives the emulator)


def conductances(tiles) -> torch.Tensor:
    """The true (noise-free) weight and reference conductances of emulated tiles."""
    return torch.stack([torch.stack([tile.devices.g, tile.references.g]) for tile in tiles]).cpu()


def bound_per_sample(trainer: Trainer, image_bytes: int) -> int:
    """The image plus every analog layer's output codes for one digit, one byte each."""
    sizes = []
    hooks = [layer.register_forward_hook(lambda _, __, out: sizes.append(out[0].numel()))
             for layer in analog_layers(trainer.model)]
    with torch.no_grad():
        trainer.model.eval()
        trainer.model(trainer.data.test.images[:1])
    for hook in hooks:
        hook.remove()
    return image_bytes + sum(sizes)


def run(board_url: str, data, steps: int, test_digits: int, out: str, pack: bool | None = None,
        ) -> tuple[Trainer, dict, float]:
    """``steps`` training steps and a test pass on ``board_url`` (LeNet packed if ``pack``): the
    trainer, its metrics row with the link traffic of the set-up, and the seconds it took."""
    config = TrainConfig(board=board_url, train_limit=steps * BATCH, test_limit=test_digits, epochs=1,
                         batch_size=BATCH, seed=0, pack=pack)
    start = time.perf_counter()
    trainer = Trainer(config, data, out, progress=False)
    setup = trainer.board.link_traffic()
    row = trainer.fit(1)[-1]
    return trainer, {**row, "setup": setup}, time.perf_counter() - start


def main(steps: int = 2, test_digits: int = 32) -> dict:
    data = load_mnist()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        emulated, emulated_row, emulator_s = run("emulator:", data, steps, test_digits, f"{scratch}/emulator")
        virtual = VirtualBoard(EmulatorConfig(soc=SoCConfig(tiles=TILES)), pace_baudrate=BAUD)
        url = virtual.open_pty()
        virtual.start()
        try:
            served, row, board_s = run(url, data, steps, test_digits, f"{scratch}/board")
            served.board.close()
        finally:
            virtual.stop()
        same = (
            emulated_row["train_loss"] == row["train_loss"]
            and emulated_row["test_acc"] == row["test_acc"]
            and torch.equal(conductances(emulated.board), conductances(virtual.firmware.board))
        )
        image_bytes = data.train.images[0].numel()
        bound = bound_per_sample(emulated, image_bytes)
    train_digits, test_count = steps * BATCH, len(served.data.test)
    per_train = (row["link_bytes_out"] + row["link_bytes_in"]) / train_digits
    setup = row["setup"]
    return {
        "same_numbers": bool(same),
        "bytes_per_training_sample": round(per_train),
        "bytes_per_test_sample": round((row["test_link_bytes_out"] + row["test_link_bytes_in"]) / test_count),
        "bound_bytes_per_training_sample": bound,
        "ratio_to_bound": round(per_train / bound, 2),
        "link_s_per_epoch": round(row["link_seconds"] / train_digits * EPOCH_DIGITS, 1),
        "chip_s_per_epoch": round(row["chip_seconds"] / train_digits * EPOCH_DIGITS, 3),
        "steps": steps,
        "batch_size": BATCH,
        "test_digits": test_count,
        "training_bytes_out_per_sample": round(row["link_bytes_out"] / train_digits),
        "training_bytes_in_per_sample": round(row["link_bytes_in"] / train_digits),
        "initial_programming_bytes": setup["link_bytes_out"] + setup["link_bytes_in"],
        "test_link_s_per_sample": round(row["test_link_seconds"] / test_count, 4),
        "baud": BAUD,
        "emulator_run_s": round(emulator_s, 1),
        "board_run_s": round(board_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(*(int(arg) for arg in sys.argv[1:3]))))
