"""Zero-shifting on strongly imbalanced pulse-programmed devices (up steps 4x the down steps).

The same small network (14x14 MNIST -> 32 -> 10, five 64x64 tiles) is trained with open-loop
pulse programming on emulators with the same seed: with references at mid-range, and after a
symmetry-point search and zero-shift of every tile. Each arm is trained at every learning rate
of a small grid and reported at its best, so neither is judged at a rate tuned for the other.
Prints JSON.

    python benchmarks/zero_shift.py [epochs]
"""

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from calibration import find_symmetry_points, zero_shift
from calibration.symmetry import SymmetrySearchConfig
from cim_hil.board import Board
from cim_hil.config import EmulatorConfig, validate
from cim_hil.emulator import build_emulator
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.training import MixedPrecisionOptimizer
from cim_hil.training.mnist import load_mnist

# About 60 up-steps across the range at mid-range, as devices used for training on the array
# need; the symmetry point G* = (4 G_max + G_min) / 5 sits 80 % up the range.
DEVICE = {"step_up_us": 0.4, "step_down_us": 0.1, "step_d2d": 0.3}
TILES = 5
LEARNING_RATES = (0.02, 0.05, 0.1, 0.2)
# Steps a fifth of the reference chip's need a longer search to land within one step of G*
# (about 10,000 pulses per device): more pairs between reads, a tighter tolerance, and 32 reads
# per estimate, since the step at G* (0.03 to 0.1 uS) is a fraction of one read's noise.
SEARCH = SymmetrySearchConfig(pairs_per_block=50, reads_per_estimate=32, max_pairs=20000, tolerance_levels=0.05,
                              settle_blocks=60)
# Both arms: the nominal pulse step is the step at the symmetry point, where up and down
# steps are equal, a_up * a_down / (a_up + a_down); weights fill a range the devices can reach
# on both sides of either reference.
STEP_AT_SYMMETRY = DEVICE["step_up_us"] * DEVICE["step_down_us"] / (DEVICE["step_up_us"] + DEVICE["step_down_us"])
MAPPING = {"programming": "pulses", "pulse_step_us": STEP_AT_SYMMETRY, "weight_fill": 0.3}


def shrink(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 2).flatten(1)  # 28x28 -> 196 inputs


def train(board, mapping, data, epochs: int, lr: float) -> float:
    torch.manual_seed(0)
    model = convert_to_analog(nn.Sequential(nn.Linear(196, 32), nn.ReLU(), nn.Linear(32, 10)), board, mapping)
    optimizer = MixedPrecisionOptimizer(model, lr=lr, rule="sgd")
    x, y = shrink(data.train.images), data.train.labels
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=order).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        test_x, test_y = shrink(data.test.images[:2000]), data.test.labels[:2000]
        return float((model(test_x).argmax(1) == test_y).float().mean())


def calibrated_board(config: EmulatorConfig) -> tuple[Board, dict]:
    """A fresh board whose tiles went through the symmetry search and zero-shift, and how well
    the search found the analytic symmetry points."""
    board = build_emulator(config)
    within, devices, pulses, residual = 0, 0, 0, []
    for tile in board:
        found = find_symmetry_points(tile, SEARCH, progress=False)
        estimate = torch.from_numpy(found["symmetry_us"])
        d = tile.devices
        truth = d.symmetry_point()
        step = d.a_up * (d.g_max - truth) / (d.g_max - d.g_min)
        within += int(((estimate - truth).abs() <= step).sum())
        devices += estimate.numel()
        pulses = found.metadata.summary["pulses_per_device"]
        shifted = zero_shift(tile, found)
        residual.append(abs(shifted.metadata.summary["residual_mean_us"]))
    return board, {
        "sp_within_one_step_fraction": within / devices,
        "pulses_per_device": pulses,
        "zero_shift_mean_residual_us": max(residual),
    }


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    config = validate(EmulatorConfig, {"device": DEVICE, "soc": {"tiles": TILES}, "seed": 1})
    data = load_mnist()
    calibrated, search = calibrated_board(config)
    state = calibrated.state_dict()  # every learning rate starts from this same calibrated chip
    without, with_ = {}, {}
    for lr in LEARNING_RATES:
        without[lr] = train(build_emulator(config), MappingConfig(**MAPPING), data, epochs, lr)
        board = build_emulator(config)
        board.load_state_dict(state)
        with_[lr] = train(board, MappingConfig(**MAPPING, reference="calibrated"), data, epochs, lr)
    best_without, best_with = max(without, key=without.get), max(with_, key=with_.get)
    print(json.dumps({
        "epochs": epochs,
        "device": DEVICE,
        "acc_without": without[best_without],
        "acc_with": with_[best_with],
        "lr_without": best_without,
        "lr_with": best_with,
        "acc_without_by_lr": without,
        "acc_with_by_lr": with_,
        **search,
    }, indent=2))


if __name__ == "__main__":
    main()
