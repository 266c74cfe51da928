"""The accuracy of a deployment over its chips, as a histogram PNG a person can look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_accuracy_histogram(report: dict, path: Path) -> Path:
    rows = report["chips"]
    arms = [("as programmed", [100 * row["accuracy"] for row in rows])]
    if rows and "calibrated_accuracy" in rows[0]:
        arms.append(("after post-training calibration", [100 * row["calibrated_accuracy"] for row in rows]))
    every = [value for _, values in arms for value in values]
    low, high = min(every), max(every)
    bins = [low + (high - low + 1e-9) * i / 12 for i in range(13)] if high > low else 12
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, values in arms:
        axis.hist(values, bins=bins, alpha=0.6, label=f"{label}: mean {sum(values) / len(values):.2f} %")
    reference = report.get("reference_accuracy")
    if reference is not None:
        axis.axvline(100 * reference, color="black", linestyle="--", label=f"on {report['reference']}: {100 * reference:.2f} %")
    kind = "chip-trained" if report["chip_trained"] else "float-trained"
    axis.set(xlabel="test accuracy (%)", ylabel="chips",
             title=f"{kind} model on {len(rows)} fresh chips ({report['test_digits']} test digits)")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.margins(x=0.05)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
