"""LeNet-5 on the offline MNIST split: float32 baseline against mixed precision on the emulator
of the reference chip (its non-idealities at their defaults), same epochs, batch and data, in
one run. Prints one JSON object.

    python benchmarks/lenet.py [epochs] [--seeds 0 1 2]

Each seed trains both arms, taking turns epoch by epoch, so a slow spell of a shared machine
falls on both. One seed's final test accuracy moves by a point or more with the seed (float32
alone spans 94.3-96.8 % over seeds 0-5 at 5 epochs), so the accuracies are means over the
seeds, with each seed's figures beside them. Seconds per epoch are medians over every epoch
of every seed (robust to warm-up and to a noisy machine).
"""

import argparse
import json
import statistics
import tempfile

from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist


def run_side_by_side(configs: list[TrainConfig], data, out_dirs: list[str]) -> list[Trainer]:
    """Train every config for its epochs, one epoch of each in turn."""
    trainers = [Trainer(config, data, out_dir, progress=False) for config, out_dir in zip(configs, out_dirs)]
    for epoch in range(1, max(config.epochs for config in configs) + 1):
        for trainer in trainers:
            trainer.fit(min(epoch, trainer.config.epochs))
    return trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("epochs", nargs="?", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    data = load_mnist()
    seeds, float_epochs, mp_epochs = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            configs = [TrainConfig(epochs=args.epochs, seed=seed, float_baseline=True),
                       TrainConfig(epochs=args.epochs, seed=seed)]
            baseline, trainer = run_side_by_side(configs, data, [f"{scratch}/float{seed}", f"{scratch}/mp{seed}"])
            float_history, mp_history = baseline.history, trainer.history
            float_seconds = [row["train_seconds"] for row in float_history]
            mp_seconds = [row["train_seconds"] for row in mp_history]
            float_epochs += float_seconds
            mp_epochs += mp_seconds
            last = mp_history[-1]
            seeds.append({
                "seed": seed,
                "float_acc": float_history[-1]["test_acc"],
                "mp_acc": last["test_acc"],
                "writes_per_weight_mean": last["writes_per_weight_mean"],
                "writes_per_weight_max": last["writes_per_weight_max"],
                "write_reduction": last["write_reduction"],
                "chip_seconds_last_epoch": last["chip_seconds"],
                "chip_energy_uj_last_epoch": last["chip_energy_uj"],
                "float_epoch_seconds": float_seconds,
                "mp_epoch_seconds": mp_seconds,
            })
    mean = lambda name: statistics.mean(row[name] for row in seeds)  # noqa: E731
    float_s, mp_s = statistics.median(float_epochs), statistics.median(mp_epochs)
    config = trainer.config
    print(json.dumps({
        "data": data.source,
        "train_digits": len(data.train),
        "test_digits": len(data.test),
        "epochs": args.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "tiles": len(trainer.board),
        "seeds": args.seeds,
        "float_acc": mean("float_acc"),
        "mp_acc": mean("mp_acc"),
        "acc_gap_points": 100 * (mean("float_acc") - mean("mp_acc")),
        "float_s_per_epoch": float_s,
        "mp_s_per_epoch": mp_s,
        "time_ratio": mp_s / float_s,
        "writes_per_weight_mean": mean("writes_per_weight_mean"),
        "writes_per_weight_max": max(row["writes_per_weight_max"] for row in seeds),
        "write_reduction": mean("write_reduction"),
        "per_seed": seeds,
    }, indent=2))


if __name__ == "__main__":
    main()
