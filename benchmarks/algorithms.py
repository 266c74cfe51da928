"""The training algorithms side by side on soft-bounds devices with the reference chip's noise.

LeNet-5 is too slow for this grid on two cores (36 tiles with A beside C, and about 40 runs):
the network is the zero-shifting paper's kind of fully connected net, at the size of
benchmarks/zero_shift.py: 14x14 MNIST -> 32 -> 10 (5 tiles of 64x64, 10 with A). Every arm
trains with the same data, batches and seed, at one learning rate per algorithm chosen before
the run (no tuning on the grid), and is tested on the same digits. Prints one JSON object:
accuracy, pulses per weight (on A and on C), seconds per epoch (wall, this machine) and chip
seconds and energy per epoch (the timing model) for every algorithm and condition, and the
expected effects, each true or false as measured.

    python benchmarks/algorithms.py [--epochs N] [--train N] [--test N] [--data-dir DIR]

Conditions (devices: soft bounds, 0.4 uS steps, read noise 0.3 and programming error 0.5 level
spacings, ADC noise 2, cycle-to-cycle 0.1, the chip's periphery):
  symmetric       a_up = a_down
  imbalance       a_up = 4 a_down (symmetry points 80 % up the range)
  sp_skew         a_up = 1.5 a_down (mean symmetry point 60 % up the range)
  sp_variability  symmetric on average, device-to-device std of the steps 40 %
  offset_10, offset_25   symmetric, and every calibrated reference off its device's symmetry
                  point by N(0, sigma_r), sigma_r 10 % and 25 % of the conductance range
Zero-shifted arms (sgd-zero-shift, ttv2, c-ttv2) start from one calibrated chip per condition
(symmetry search and zero-shift of every tile); the others from the fresh chip, references at
mid-range (AGAD brings A to its symmetry points by pulses alone). The offsets change only
calibrated references, so arms without them are not run again under offsets.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from calibration import calibrate_references
from cim_hil.config import EmulatorConfig, validate
from cim_hil.emulator import build_emulator
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.training.algorithms import AlgorithmConfig
from cim_hil.training.algorithms.build import build_optimizer
from cim_hil.training.mnist import load_mnist

TILES = 5
STEP_US = 0.4
CONDITIONS = {
    "symmetric": dict(step_up_us=STEP_US, step_down_us=STEP_US),
    "imbalance": dict(step_up_us=4 * STEP_US, step_down_us=STEP_US),
    "sp_skew": dict(step_up_us=1.5 * STEP_US, step_down_us=STEP_US),
    "sp_variability": dict(step_up_us=STEP_US, step_down_us=STEP_US, step_d2d=0.4),
    "offset_10": dict(step_up_us=STEP_US, step_down_us=STEP_US),
    "offset_25": dict(step_up_us=STEP_US, step_down_us=STEP_US),
}
OFFSETS = {"offset_10": 0.10, "offset_25": 0.25}
# (algorithm for build_optimizer, learning rate, rule, zero-shifted chip)
ARMS = {
    "mp": ("mp", 3e-3, "adam", False),
    "mp-no-accumulation": ("mp-no-accumulation", 3e-3, "adam", False),
    "sgd": ("sgd", 0.05, "sgd", False),
    "sgd-zero-shift": ("sgd", 0.05, "sgd", True),
    "ttv2": ("ttv2", 0.05, "sgd", True),
    "c-ttv2": ("c-ttv2", 0.05, "sgd", True),
    "agad": ("agad", 0.05, "sgd", False),
}
OPTIONS = AlgorithmConfig(transfer_lr=0.05, transfer_columns=32, settle_pairs=300)
NEEDS_REFERENCES = {"sgd-zero-shift", "ttv2", "c-ttv2"}


def shrink(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 2).flatten(1)  # 28x28 -> 196 inputs


def mapping_for(arm: str) -> MappingConfig:
    if ARMS[arm][0].startswith("mp"):
        return MappingConfig()  # write-verify to levels, as the reference chip
    # The nominal pulse is the step at mid-range; weights fill a third of the reach.
    return MappingConfig(programming="pulses", pulse_step_us=STEP_US / 2, weight_fill=0.3,
                         reference="calibrated" if arm == "sgd-zero-shift" else "middle")


def calibrated_state(config: EmulatorConfig, offset: float, seed: int, kept: dict) -> dict:
    """Every tile zero-shifted (once per device population, kept in ``kept``); with ``offset``,
    each reference then moved off its symmetry point by N(0, offset * range) (within the
    range) and programmed there by write-verify."""
    key = config.model_dump_json()
    board = build_emulator(config)
    if key in kept:
        board.load_state_dict(kept[key])
    else:
        for tile in board:
            calibrate_references(tile)
        kept[key] = board.state_dict()
    if offset:
        spec = board[0].spec
        generator = torch.Generator().manual_seed(seed)
        for tile in board:
            error = torch.randn(spec.rows, spec.cols, generator=generator) * offset * (spec.g_max_us - spec.g_min_us)
            reference = torch.stack([tile.read_reference().float().cpu() for _ in range(8)]).mean(0)
            tile.program_reference((reference + error).clamp(spec.g_min_us, spec.g_max_us))
    return board.state_dict()


def train(arm: str, config: EmulatorConfig, state: dict | None, data, epochs: int) -> dict:
    algorithm, lr, rule, _ = ARMS[arm]
    board = build_emulator(config)
    if state is not None:
        board.load_state_dict(state)
    torch.manual_seed(0)
    model = convert_to_analog(nn.Sequential(nn.Linear(196, 32), nn.ReLU(), nn.Linear(32, 10)), board, mapping_for(arm))
    optimizer = build_optimizer(algorithm, model, board, lr, rule, OPTIONS, seed=0, calibrate=lambda tile: None)
    x, y = shrink(data.train.images), data.train.labels
    order = torch.Generator().manual_seed(0)
    before = board.counters
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=order).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    spent = board.counters
    with torch.no_grad():
        accuracy = float((model(shrink(data.test.images)).argmax(1) == data.test.labels).float().mean())
    stats = optimizer.write_statistics()
    weights = stats["analog_weights"]
    if "pulses_a" in stats:
        per_weight = {"pulses_a_per_weight": stats["pulses_a_per_weight"], "pulses_c_per_weight": stats["pulses_c_per_weight"]}
    else:  # mixed precision: write-verify pulses on the weight (and reference) devices
        per_weight = {"pulses_a_per_weight": 0.0, "pulses_c_per_weight": (spent.pulses - before.pulses) / weights}
    return {"test_acc": accuracy, **per_weight, "seconds_per_epoch": seconds / epochs,
            "chip_seconds_per_epoch": (spent.seconds - before.seconds) / epochs,
            "chip_energy_uj_per_epoch": (spent.energy_nj - before.energy_nj) / 1000 / epochs}


def expectations(results: dict) -> dict:
    def acc(arm, condition="symmetric"):
        return results[condition][arm]["test_acc"]

    return {
        "mp_no_accumulation_trails_mp_by_10_points": acc("mp") - acc("mp-no-accumulation") > 0.10,
        "sgd_collapses_under_imbalance": acc("sgd", "imbalance") < acc("sgd") - 0.10,
        "zero_shifting_recovers_sgd_under_imbalance": acc("sgd-zero-shift", "imbalance") > acc("sgd", "imbalance") + 0.10,
        "ttv2_degrades_with_reference_offsets": acc("ttv2", "offset_25") < acc("ttv2") - 0.01,
        "c_ttv2_holds_within_1_point_at_sigma_r_25": acc("c-ttv2", "offset_25") >= acc("c-ttv2") - 0.01,
        "agad_holds_within_1_point_at_sigma_r_25": acc("agad", "offset_25") >= acc("agad") - 0.01,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train", type=int, default=4000, help="training digits")
    parser.add_argument("--test", type=int, default=2000, help="test digits")
    parser.add_argument("--data-dir", help="directory with the MNIST IDX files (default: the offline data)")
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    args = parser.parse_args()
    data = load_mnist(args.data_dir)
    data.train, data.test = data.train.head(args.train), data.test.head(args.test)
    began = time.perf_counter()
    results: dict[str, dict] = {}
    kept: dict[str, dict] = {}
    for condition in args.conditions:
        device = dict(CONDITIONS[condition])
        config = validate(EmulatorConfig, {"device": device, "soc": {"tiles": 2 * TILES}, "seed": 1})
        offset = OFFSETS.get(condition, 0.0)
        arms = [arm for arm in args.arms if not offset or arm in NEEDS_REFERENCES]
        state = calibrated_state(config, offset, 2, kept) if any(ARMS[arm][3] for arm in arms) else None
        results[condition] = {arm: train(arm, config, state if ARMS[arm][3] else None, data, args.epochs) for arm in arms}
        for arm in args.arms:  # arms the offsets cannot touch keep their offset-free figures
            results[condition].setdefault(arm, {**results["symmetric"][arm], "same_as": "symmetric"}
                                          if "symmetric" in results and arm in results["symmetric"] else None)
    complete = all(condition in results for condition in CONDITIONS) and set(args.arms) == set(ARMS)
    print(json.dumps({
        "network": "196-32-10 fully connected (14x14 MNIST), 5 tiles of 64x64 (10 with A)",
        "epochs": args.epochs, "train_digits": len(data.train), "test_digits": len(data.test), "data": data.source,
        "learning_rates": {arm: ARMS[arm][1] for arm in ARMS}, "options": OPTIONS.model_dump(),
        "results": results,
        "expected_effects": expectations(results) if complete else None,
        "total_seconds": time.perf_counter() - began,
    }, indent=2))


if __name__ == "__main__":
    main()
