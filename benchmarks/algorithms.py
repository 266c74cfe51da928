"""The training algorithms side by side on soft-bounds devices with the reference chip's noise.

The network is the zero-shifting paper's kind of 3-layer fully connected network (the RPU
papers it builds on train 784-256-128-10), on 14x14 digits and narrower: 196-64-32-10 with
ReLU (6 tiles of 64x64, 12 with A). LeNet-5 does not fit the sweep: from scratch by pulses it
needs many more epochs than 15 minutes on two cores allow (the README has the measured
figures). Prints one JSON object.

Every run trains on the same digits in the same batches with the same seeds. Each arm's
learning rate (for the transfer family: lr and transfer_lr together, then ``in_chop_prob``) is
chosen by a small sweep on the symmetric condition alone, by accuracy on held-out training
digits (never the test digits): the candidates are fixed below, the whole sweep is in the JSON,
and the other conditions run with what it chose. ``transfer_every`` (1) and
``transfer_columns`` (32: every column of A read every 6-7 steps) are fixed: they set the read
cost. Then every arm runs on every condition, and the expected effects are computed from the
test accuracies, each true or false as measured.

    python benchmarks/algorithms.py [--epochs N] [--train N] [--test N] [--jobs N] [--data-dir DIR]

Conditions (devices: soft bounds, 0.4 uS steps, read noise 0.3 and programming error 0.5 level
spacings, ADC noise 2, cycle-to-cycle 0.1, the chip's periphery):
  symmetric       a_up = a_down
  imbalance       a_up = 4 a_down (symmetry points 80 % up the range)
  sp_skew         a_up = 1.5 a_down (mean symmetry point 60 % up the range)
  sp_variability  symmetric on average, device-to-device std of the steps 40 %
  offset_10, offset_25   symmetric, and every calibrated reference off its device's symmetry
                  point by N(0, sigma_r), sigma_r 10 % and 25 % of the conductance range
Zero-shifted arms (sgd-zero-shift, ttv2, c-ttv2) start from one calibrated chip per device
population (symmetry search and zero-shift of every tile); the others from the fresh chip,
references at mid-range (AGAD brings A to its symmetry points by pulses alone). The offsets
change only calibrated references, so the arms without them (AGAD among them: it reads no
reference devices) are not run again under offsets: their rows say ``same_as``.

Runs go to ``--jobs`` worker processes (one thread each, so a run's numbers do not depend on
how many there are); ``load_average`` says how busy the machine was, beside the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from calibration import calibrate_references
from cim_hil.config import EmulatorConfig, validate
from cim_hil.emulator import build_emulator
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.tile import averaged_read
from cim_hil.training.algorithms import AlgorithmConfig
from cim_hil.training.algorithms.build import build_optimizer
from cim_hil.training.mnist import load_mnist

NETWORK = "196-64-32-10 fully connected, ReLU (14x14 MNIST), 6 tiles of 64x64 (12 with A)"
TILES = 6
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
# (algorithm for build_optimizer, rule, zero-shifted chip)
ARMS = {
    "mp": ("mp", "adam", False),
    "mp-no-accumulation": ("mp-no-accumulation", "adam", False),
    "sgd": ("sgd", "sgd", False),
    "sgd-zero-shift": ("sgd", "sgd", True),
    "ttv2": ("ttv2", "sgd", True),
    "c-ttv2": ("c-ttv2", "sgd", True),
    "agad": ("agad", "sgd", False),
}
NEEDS_REFERENCES = {arm for arm, (_, _, zero_shifted) in ARMS.items() if zero_shifted}
# The sweep's candidates, fixed before any run, in stages: each stage's candidates run at the
# best of the stages before. The transfer family's lr is A's; C's rate is set by lr * transfer_lr
# and damped by A's decay to its symmetry points, which needs pulses on A: so lr and
# transfer_lr are swept together, from a slow A (lr 0.05) to a fast one with a slow buffer.
ADAM_LRS, SGD_LRS = (1e-3, 3e-3, 1e-2), (0.025, 0.05, 0.1)
TRANSFER_LRS = {"lr": (0.05, 0.2, 0.8), "transfer_lr": (0.05, 0.0125, 0.003125)}
CHOP_PROBS = (0.1, 0.02)  # aihwkit's default, and near its presets' 0.01-0.02
OPTIONS = AlgorithmConfig(transfer_lr=0.05, transfer_columns=32, settle_pairs=300)


def stages(arm: str) -> list[list[dict]]:
    """What the sweep tries for ``arm``, stage after stage."""
    algorithm = ARMS[arm][0]
    if algorithm in ("mp", "mp-no-accumulation", "sgd"):
        return [[{"lr": lr} for lr in (ADAM_LRS if algorithm.startswith("mp") else SGD_LRS)]]
    grid = [[{"lr": lr, "transfer_lr": rate} for lr in TRANSFER_LRS["lr"] for rate in TRANSFER_LRS["transfer_lr"]]]
    return grid + ([[{"in_chop_prob": p} for p in CHOP_PROBS]] if algorithm != "ttv2" else [])


def network() -> nn.Sequential:
    return nn.Sequential(nn.Linear(196, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def shrink(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 2).flatten(1)  # 28x28 -> 196 inputs


def mapping_for(arm: str) -> MappingConfig:
    if ARMS[arm][0].startswith("mp"):
        return MappingConfig()  # write-verify to levels, as the reference chip
    # The nominal pulse is the step at mid-range; weights fill a third of the reach.
    return MappingConfig(programming="pulses", pulse_step_us=STEP_US / 2, weight_fill=0.3,
                         reference="calibrated" if arm == "sgd-zero-shift" else "middle")


def emulator_config(condition: str) -> EmulatorConfig:
    return validate(EmulatorConfig, {"device": dict(CONDITIONS[condition]), "soc": {"tiles": 2 * TILES}, "seed": 1})


_DATA = {}  # each worker's digits, loaded once by ``_load``


def _load(data_dir: str | None, train: int, test: int, validation: int) -> None:
    torch.set_num_threads(1)
    data = load_mnist(data_dir)
    if train + validation > len(data.train):
        raise SystemExit(f"--train {train} and {validation} validation digits exceed the {len(data.train)} training digits")
    _DATA.update(x=shrink(data.train.images[:train]), y=data.train.labels[:train],
                 validation=(shrink(data.train.images[-validation:]), data.train.labels[-validation:]),
                 test=(shrink(data.test.images[:test]), data.test.labels[:test]), source=data.source)


def calibrated(condition: str) -> dict:
    """The chip of ``condition``'s device population with every tile zero-shifted."""
    board = build_emulator(emulator_config(condition))
    for tile in board:
        calibrate_references(tile)
    return board.state_dict()


def with_offsets(condition: str, state: dict, seed: int = 2) -> dict:
    """``state`` (calibrated) with each reference moved off its symmetry point by
    N(0, sigma_r * range), within the range, programmed there by write-verify."""
    board = build_emulator(emulator_config(condition))
    board.load_state_dict(state)
    spec = board[0].spec
    generator = torch.Generator().manual_seed(seed)
    for tile in board:
        error = torch.randn(spec.rows, spec.cols, generator=generator) * OFFSETS[condition] * (spec.g_max_us - spec.g_min_us)
        reference = averaged_read(tile.read_reference, 8)
        tile.program_reference((reference + error).clamp(spec.g_min_us, spec.g_max_us))
    return board.state_dict()


def accuracy(model: nn.Module, split) -> float:
    with torch.no_grad():
        return float((model(split[0]).argmax(1) == split[1]).float().mean())


def train(arm: str, condition: str, hyper: dict, state: dict | None, epochs: int) -> dict:
    """One arm on one condition with ``hyper`` (lr and the algorithm's options)."""
    algorithm, rule, _ = ARMS[arm]
    board = build_emulator(emulator_config(condition))
    if state is not None:
        board.load_state_dict(state)
    torch.manual_seed(0)
    model = convert_to_analog(network(), board, mapping_for(arm))
    options = OPTIONS.model_copy(update={k: v for k, v in hyper.items() if k != "lr"})
    optimizer = build_optimizer(algorithm, model, board, hyper["lr"], rule, options, seed=0, calibrate=lambda tile: None)
    x, y = _DATA["x"], _DATA["y"]
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
    stats = optimizer.write_statistics()
    weights = stats["analog_weights"]
    if "pulses_a" in stats:
        per_weight = {"pulses_a_per_weight": stats["pulses_a_per_weight"], "pulses_c_per_weight": stats["pulses_c_per_weight"]}
    else:  # mixed precision: write-verify pulses on the weight (and reference) devices
        per_weight = {"pulses_a_per_weight": 0.0, "pulses_c_per_weight": (spent.pulses - before.pulses) / weights}
    return {"test_acc": accuracy(model, _DATA["test"]), "validation_acc": accuracy(model, _DATA["validation"]),
            **hyper, **per_weight, "seconds_per_epoch": seconds / epochs,
            "chip_seconds_per_epoch": (spent.seconds - before.seconds) / epochs,
            "chip_energy_uj_per_epoch": (spent.energy_nj - before.energy_nj) / 1000 / epochs}


def sweep(arm: str, pool: ProcessPoolExecutor, state: dict | None, epochs: int) -> tuple[dict, list[dict]]:
    """The symmetric condition's run with the best validation accuracy, and every run tried."""
    hyper = {key: value for stage in stages(arm) for key, value in stage[0].items()}
    best, tried = None, []
    for stage in stages(arm):  # the best run so far already tried this stage's first candidate
        runs = [pool.submit(train, arm, "symmetric", {**hyper, **candidate}, state, epochs)
                for candidate in stage[best is not None:]]
        tried += [run.result() for run in runs]
        best = max([best] * (best is not None) + tried[len(tried) - len(runs):], key=lambda r: r["validation_acc"])
        hyper = {key: best[key] for key in hyper}
    return best, tried


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
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=4000, help="training digits")
    parser.add_argument("--validation", type=int, default=1000, help="held-out training digits that choose the lr")
    parser.add_argument("--test", type=int, default=2000, help="test digits")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--data-dir", help="directory with the MNIST IDX files (default: the offline data)")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    began, load_before = time.perf_counter(), os.getloadavg()
    _load(args.data_dir, args.train, args.test, args.validation)
    populations = {condition for condition in CONDITIONS if condition not in OFFSETS}
    needs = NEEDS_REFERENCES & set(args.arms)
    with ProcessPoolExecutor(args.jobs, initializer=_load,
                             initargs=(args.data_dir, args.train, args.test, args.validation)) as pool:
        zero_shifted = {c: pool.submit(calibrated, c) for c in sorted(populations)} if needs else {}
        states = {c: future.result() for c, future in zero_shifted.items()}
        states.update({c: with_offsets(c, states["symmetric"]) for c in OFFSETS if needs})

        def arm_results(arm: str) -> tuple[dict, list[dict], dict]:
            state = (lambda c: states[c] if arm in NEEDS_REFERENCES else None)
            best, tried = sweep(arm, pool, state("symmetric"), args.epochs)
            hyper = {key: best[key] for stage in stages(arm) for key in stage[0]}
            others = [c for c in CONDITIONS if c != "symmetric" and (c not in OFFSETS or arm in NEEDS_REFERENCES)]
            runs = {c: pool.submit(train, arm, c, hyper, state(c), args.epochs) for c in others}
            rows = {"symmetric": best, **{c: run.result() for c, run in runs.items()}}
            return hyper, tried, {c: rows.get(c, {"same_as": "symmetric", **best}) for c in CONDITIONS}

        with ThreadPoolExecutor(len(args.arms)) as threads:
            done = dict(zip(args.arms, threads.map(arm_results, args.arms)))
    results = {c: {arm: done[arm][2][c] for arm in args.arms} for c in CONDITIONS}
    print(json.dumps({
        "network": NETWORK, "epochs": args.epochs, "train_digits": args.train, "validation_digits": args.validation,
        "test_digits": args.test, "data": _DATA["source"], "options": OPTIONS.model_dump(),
        "sweep_stages": {arm: stages(arm) for arm in args.arms},
        "chosen_on_symmetric": {arm: done[arm][0] for arm in args.arms},
        "sweep": {arm: [{key: run[key] for key in (*done[arm][0], "validation_acc", "test_acc")} for run in done[arm][1]]
                  for arm in args.arms},
        "results": results,
        "expected_effects": expectations(results) if set(args.arms) == set(ARMS) else None,
        "jobs": args.jobs, "total_seconds": time.perf_counter() - began,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }, indent=2))


if __name__ == "__main__":
    main()
