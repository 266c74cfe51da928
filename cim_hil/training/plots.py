"""Training curves as a PNG a person can look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], path: Path, title: str) -> None:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
    acc_axis.plot(epochs, [100 * row["train_acc"] for row in history], marker="o", label="train")
    acc_axis.plot(epochs, [100 * row["test_acc"] for row in history], marker="o", label="test")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc_axis.legend()
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
