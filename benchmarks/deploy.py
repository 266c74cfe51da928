"""From a training chip to inference chips: the same LeNet-5, trained in float32 on the host and
trained with mixed precision on the emulator (its training chip: seed 0), deployed onto the
same fresh chips (seeds 1000, 1001, ...), as programmed and after post-training calibration.
Prints one JSON object.

    python benchmarks/deploy.py [--epochs 3] [--chips 10] [--test-limit 1000]

Each model's drop is against its own accuracy where it was trained: on its training chip, or on
the host for float32, on the same test digits. ``columns`` is the column-range step alone,
``inputs`` the column ranges then fixed DAC input ranges, ``calibrated`` all three steps (the
ADC ranges last); ``recovered`` is the fraction of the drop each wins back (null when there is
no drop to recover). ``accuracy_after_time`` is the calibrated chips' accuracy 1 s, 1 h and 1 day
after programming, as the emulator's conductances relax (its relaxation model, defaults).
"""

import argparse
import json
import tempfile
import time

from cim_hil.deploy import DeployConfig, deploy, load_trained
from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist

RELAX = {"1s": 1.0, "1h": 3600.0, "1d": 86400.0}  # times after programming, in the order evaluated


def _arm(report: dict) -> dict:
    drop = report["drop_points"]
    def recovered(accuracy: dict) -> float | None:
        return (100 * accuracy["mean"] - 100 * report["accuracy"]["mean"]) / drop if drop > 0 else None
    keep = ("mean", "std", "min")
    return {
        "reference_accuracy": report["reference_accuracy"],
        "reference": report["reference"],
        "accuracy": {k: report["accuracy"][k] for k in keep},
        "columns_accuracy": {k: report["columns_accuracy"][k] for k in keep},
        "inputs_accuracy": {k: report["inputs_accuracy"][k] for k in keep},
        "calibrated_accuracy": {k: report["calibrated_accuracy"][k] for k in keep},
        "drop_points": drop,
        "columns_drop_points": 100 * (report["reference_accuracy"] - report["columns_accuracy"]["mean"]),
        "inputs_drop_points": 100 * (report["reference_accuracy"] - report["inputs_accuracy"]["mean"]),
        "calibrated_drop_points": report["calibrated_drop_points"],
        "columns_recovered": recovered(report["columns_accuracy"]),
        "inputs_recovered": recovered(report["inputs_accuracy"]),
        "calibrated_recovered": recovered(report["calibrated_accuracy"]),
        "adc_step_points": 100 * (report["calibrated_accuracy"]["mean"] - report["inputs_accuracy"]["mean"]),
        "accuracy_after_time": {name: {k: after[k] for k in keep}
                                for name, after in zip(RELAX, report["relaxed_accuracy"])},
        "write_verify_failures_mean": report["write_verify_failures"]["mean"],
        "programming_chip_seconds_mean": report["programming_chip_seconds"]["mean"],
        "programming_energy_uj_mean": report["programming_energy_uj"]["mean"],
        "seconds_per_chip": report["host_seconds_per_chip"],
        "per_chip": [{"seed": row["seed"], "accuracy": row["accuracy"], "columns": row["columns_accuracy"],
                      "inputs": row["inputs_accuracy"], "calibrated": row["calibrated_accuracy"],
                      "adc_ranges_ua": row["calibration"]["adc_ranges"],
                      "after_time": [after["accuracy"] for after in row["relaxed"]]} for row in report["chips"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--chips", type=int, default=10)
    parser.add_argument("--test-limit", type=int, default=1000)
    args = parser.parse_args()
    start = time.perf_counter()
    data = load_mnist()
    config = DeployConfig(chips=args.chips, test_limit=args.test_limit, relax_after_s=tuple(RELAX.values()))
    arms, training_seconds = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, float_baseline in (("float_trained", True), ("chip_trained", False)):
            began = time.perf_counter()
            run = f"{scratch}/{name}"
            Trainer(TrainConfig(epochs=args.epochs, float_baseline=float_baseline, test_limit=args.test_limit),
                    data, run, progress=False).fit()
            training_seconds[name] = time.perf_counter() - began
            arms[name] = _arm(deploy(load_trained(run), data, "emulator:", config, progress=False))
    chip, host = arms["chip_trained"], arms["float_trained"]
    deployed = [arm["seconds_per_chip"] for arm in arms.values()]
    print(json.dumps({
        "chips": args.chips,
        "seeds": [row["seed"] for row in chip["per_chip"]],
        "test_digits": args.test_limit,
        "data": data.source,
        "chip_trained_drop_points": chip["drop_points"],
        "float_trained_drop_points": host["drop_points"],
        "chip_trained_calibrated_drop_points": chip["calibrated_drop_points"],
        "float_trained_calibrated_drop_points": host["calibrated_drop_points"],
        "expected": {
            "chip_trained_loses_less": chip["drop_points"] < host["drop_points"],
            "calibration_recovers_half_of_float_drop": None if host["calibrated_recovered"] is None
            else host["calibrated_recovered"] >= 0.5,
            "calibration_recovers_half_of_chip_drop": None if chip["calibrated_recovered"] is None
            else chip["calibrated_recovered"] >= 0.5,
            "columns_alone_recover_half_of_float_drop": None if host["columns_recovered"] is None
            else host["columns_recovered"] >= 0.5,
            "adc_step_helps_float": host["adc_step_points"] > 0,
            "adc_step_helps_chip": chip["adc_step_points"] > 0,
        },
        "seconds_per_chip": sum(deployed) / len(deployed),
        "training_seconds": training_seconds,
        "total_seconds": time.perf_counter() - start,
        **arms,
    }, indent=2))


if __name__ == "__main__":
    main()
