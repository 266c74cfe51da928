"""What protocol v3's windows save on a serial line: packed LeNet trained on a virtual board.

LeNet-5 packed onto 12 tiles of 64x64 (``cim-hil train --pack``), trained a fixed number of
steps by ``cim-hil train``'s trainer through two virtual boards on pseudo-terminals paced like
a UART at 921,600 baud: one whose firmware reads windows (SPEC.md §8.5: a packed block's
product names its window, a packed layer goes as one LAYER_FORWARD) and one from before
windows (each block's product padded with zeros up to its window, a FORWARD per block), and
on the in-process emulator with the same seed.

- ``bytes_per_training_sample_windows`` / ``_padded``: wire bytes both ways of the training
  pass per digit (the one-off initial programming apart, as ``initial_programming_bytes``);
  ``saved_fraction``: what windows save of the padded figure. Per test digit likewise.
- ``bound_bytes_per_training_sample``: the image plus every analog layer's output codes (a
  byte each), and each figure's ratio to it.
- ``padded_same_numbers``: the board without windows gave the emulator's losses, test accuracy
  and conductances exactly; ``windows_same_conductances`` and ``windows_loss_difference``: with
  windows the board sums its row blocks' ADC codes (SPEC.md §8.3), the emulator their
  currents, so losses agree to float rounding.

    python benchmarks/packed_windows.py [steps] [test_digits]
"""

import json
import sys
import tempfile
import time

import torch
from board_training import BATCH, BAUD, bound_per_sample, conductances, run

from cim_hil.config import EmulatorConfig, SoCConfig
from cim_hil.training.mnist import load_mnist
from drivers.simulators.virtual_board import VirtualBoard

TILES = 12  # LeNet-5 packed on 64x64 tiles


def on_board(windows: bool, data, steps: int, test_digits: int, out: str) -> tuple[dict, torch.Tensor]:
    virtual = VirtualBoard(EmulatorConfig(soc=SoCConfig(tiles=TILES)), pace_baudrate=BAUD, windows=windows)
    url = virtual.open_pty()
    virtual.start()
    try:
        trainer, row, _ = run(url, data, steps, test_digits, out, pack=True)
        trainer.board.close()
    finally:
        virtual.stop()
    return row, conductances(virtual.firmware.board)


def main(steps: int = 2, test_digits: int = 32) -> dict:
    data = load_mnist()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        emulated, emulated_row, _ = run("emulator:", data, steps, test_digits, f"{scratch}/emulator", pack=True)
        windowed, windowed_g = on_board(True, data, steps, test_digits, f"{scratch}/windows")
        padded, padded_g = on_board(False, data, steps, test_digits, f"{scratch}/padded")
        emulated_g = conductances(emulated.board)
        bound = bound_per_sample(emulated, data.train.images[0].numel())
    train_digits, test_count = steps * BATCH, test_digits

    def per(row: dict, kind: str, digits: int) -> float:
        return (row[f"{kind}link_bytes_out"] + row[f"{kind}link_bytes_in"]) / digits

    with_windows, without = per(windowed, "", train_digits), per(padded, "", train_digits)
    return {
        "bytes_per_training_sample_windows": round(with_windows),
        "bytes_per_training_sample_padded": round(without),
        "saved_fraction": round(1 - with_windows / without, 3),
        "bytes_per_test_sample_windows": round(per(windowed, "test_", test_count)),
        "bytes_per_test_sample_padded": round(per(padded, "test_", test_count)),
        "bound_bytes_per_training_sample": bound,
        "ratio_to_bound_windows": round(with_windows / bound, 2),
        "ratio_to_bound_padded": round(without / bound, 2),
        "link_s_per_training_sample_windows": round(windowed["link_seconds"] / train_digits, 4),
        "link_s_per_training_sample_padded": round(padded["link_seconds"] / train_digits, 4),
        "initial_programming_bytes": windowed["setup"]["link_bytes_out"] + windowed["setup"]["link_bytes_in"],
        "padded_same_numbers": bool(
            padded["train_loss"] == emulated_row["train_loss"] and padded["test_acc"] == emulated_row["test_acc"]
            and torch.equal(padded_g, emulated_g)),
        "windows_same_conductances": bool(torch.equal(windowed_g, emulated_g)),
        "windows_loss_difference": abs(windowed["train_loss"] - emulated_row["train_loss"]),
        "windows_test_acc": windowed["test_acc"],
        "emulator_test_acc": emulated_row["test_acc"],
        "steps": steps,
        "batch_size": BATCH,
        "test_digits": test_count,
        "tiles": TILES,
        "baud": BAUD,
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(*(int(arg) for arg in sys.argv[1:3]))))
