"""LeNet-5 on the offline MNIST split: float32 baseline against mixed precision on the emulator
of the reference chip (its non-idealities at their defaults), same epochs, batch and data, in
one run. Prints one JSON object.

    python benchmarks/lenet.py [epochs]
"""

import json
import statistics
import sys
import tempfile

from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist


def run(config: TrainConfig, data, out_dir: str) -> tuple[dict, float, Trainer]:
    trainer = Trainer(config, data, out_dir, progress=False)
    history = trainer.fit()
    seconds = statistics.median(row["train_seconds"] for row in history)  # robust to warm-up
    return history[-1], seconds, trainer


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    data = load_mnist()
    with tempfile.TemporaryDirectory() as scratch:
        float_last, float_s, _ = run(TrainConfig(epochs=epochs, float_baseline=True), data, f"{scratch}/float")
        mp_last, mp_s, trainer = run(TrainConfig(epochs=epochs), data, f"{scratch}/mp")
    config = trainer.config
    print(json.dumps({
        "data": data.source,
        "train_digits": len(data.train),
        "test_digits": len(data.test),
        "epochs": epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "tiles": len(trainer.board),
        "float_acc": float_last["test_acc"],
        "mp_acc": mp_last["test_acc"],
        "acc_gap_points": 100 * (float_last["test_acc"] - mp_last["test_acc"]),
        "float_s_per_epoch": float_s,
        "mp_s_per_epoch": mp_s,
        "time_ratio": mp_s / float_s,
        "writes_per_weight_mean": mp_last["writes_per_weight_mean"],
        "writes_per_weight_max": mp_last["writes_per_weight_max"],
        "write_reduction": mp_last["write_reduction"],
        "chip_seconds_last_epoch": mp_last["chip_seconds"],
        "chip_energy_uj_last_epoch": mp_last["chip_energy_uj"],
    }, indent=2))


if __name__ == "__main__":
    main()
