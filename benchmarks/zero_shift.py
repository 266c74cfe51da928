"""Zero-shifting on strongly imbalanced pulse-programmed devices (up steps 4x the down steps).

The same small network (14x14 MNIST -> 32 -> 10, five 64x64 tiles) is trained twice with
open-loop pulse programming on emulators with the same seed: once with references at
mid-range, once after a symmetry-point search and zero-shift of every tile. Prints JSON.

    python benchmarks/zero_shift.py [epochs]
"""

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from calibration import find_symmetry_points, zero_shift
from cim_hil.config import EmulatorConfig, validate
from cim_hil.emulator import build_emulator
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.training import MixedPrecisionOptimizer
from cim_hil.training.mnist import load_mnist

DEVICE = {"step_up_us": 2.0, "step_down_us": 0.5, "step_d2d": 0.3}
TILES = 5
# Both runs: the nominal pulse step is the step at the symmetry point, where up and down
# steps are equal, a_up * a_down / (a_up + a_down); weights fill a range the devices can reach
# on both sides of either reference.
STEP_AT_SYMMETRY = DEVICE["step_up_us"] * DEVICE["step_down_us"] / (DEVICE["step_up_us"] + DEVICE["step_down_us"])
MAPPING = {"programming": "pulses", "pulse_step_us": STEP_AT_SYMMETRY, "weight_fill": 0.3}


def shrink(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 2).flatten(1)  # 28x28 -> 196 inputs


def train(board, mapping, data, epochs: int) -> float:
    torch.manual_seed(0)
    model = convert_to_analog(nn.Sequential(nn.Linear(196, 32), nn.ReLU(), nn.Linear(32, 10)), board, mapping)
    optimizer = MixedPrecisionOptimizer(model, lr=0.05, rule="sgd")
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


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    config = validate(EmulatorConfig, {"device": DEVICE, "soc": {"tiles": TILES}, "seed": 1})
    data = load_mnist()
    acc_without = train(build_emulator(config), MappingConfig(**MAPPING), data, epochs)

    board = build_emulator(config)
    within, devices, pulses, residual = 0, 0, 0, []
    for tile in board:
        found = find_symmetry_points(tile, progress=False)
        estimate = torch.from_numpy(found["symmetry_us"])
        d = tile.devices
        truth = d.symmetry_point()
        step = d.a_up * (d.g_max - truth) / (d.g_max - d.g_min)
        within += int(((estimate - truth).abs() <= step).sum())
        devices += estimate.numel()
        pulses = found.metadata.summary["pulses_per_device"]
        shifted = zero_shift(tile, found)
        residual.append(abs(shifted.metadata.summary["residual_mean_us"]))
    acc_with = train(board, MappingConfig(**MAPPING, reference="calibrated"), data, epochs)
    print(json.dumps({
        "epochs": epochs,
        "device": DEVICE,
        "acc_without": acc_without,
        "acc_with": acc_with,
        "sp_within_one_step_fraction": within / devices,
        "pulses_per_device": pulses,
        "zero_shift_mean_residual_us": max(residual),
    }, indent=2))


if __name__ == "__main__":
    main()
