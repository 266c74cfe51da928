"""PNG pictures of devices: symmetry points, zero-shift residuals, pulse responses, conductance maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from calibration.results import CalibrationResult  # noqa: E402


def _save(figure, path: Path) -> Path:
    path = Path(path).with_suffix(".png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_symmetry(result: CalibrationResult, path: Path) -> Path:
    values = result["symmetry_us"]
    figure, (hist, grid) = plt.subplots(1, 2, figsize=(11, 4.5))
    finite = values[np.isfinite(values)]
    hist.hist(finite, bins=40, color="tab:blue")
    hist.set(xlabel="symmetry point G* (uS)", ylabel="devices",
             title=f"{finite.size} devices; {int(result['stuck'].sum())} stuck, {int(result['not_converged'].sum())} not converged")
    image = grid.imshow(values, cmap="viridis")
    grid.set(xlabel="column", ylabel="row", title="G* map (blank: flagged)")
    figure.colorbar(image, ax=grid, label="uS")
    return _save(figure, path)


def plot_residual(result: CalibrationResult, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 5))
    residual = result["residual_us"]
    limit = float(np.nanmax(np.abs(residual))) if np.isfinite(residual).any() else 1.0
    image = axis.imshow(residual, cmap="coolwarm", vmin=-limit, vmax=limit)
    axis.set(xlabel="column", ylabel="row", title="weight after zero-shift, G - G_ref")
    figure.colorbar(image, ax=axis, label="uS")
    return _save(figure, path)


def plot_pulse_response(result: CalibrationResult, path: Path, devices: int = 6) -> Path:
    """Measured curves of a few devices, with the curves their fitted parameters predict."""
    curve = result["curve_us"]
    n = (curve.shape[0] - 1) // 2
    rows, cols = curve.shape[1:]
    picks = [(i * rows // devices, i * cols // devices) for i in range(devices)]
    figure, axis = plt.subplots(figsize=(8, 5))
    for index, (r, c) in enumerate(picks):
        colour = f"C{index}"
        axis.plot(curve[:, r, c], ".", color=colour, label=f"device ({r}, {c})")
        if not result["fitted"][r, c]:
            continue
        g_min, g_max = result["g_min_us"][r, c], result["g_max_us"][r, c]
        a_up, a_down = result["a_up_us"][r, c], result["a_down_us"][r, c]
        model = [curve[0, r, c]]
        for k in range(2 * n):
            g = model[-1]
            step = a_up * (g_max - g) if k < n else -a_down * (g - g_min)
            model.append(g + step / (g_max - g_min))
        axis.plot(model, "-", color=colour, alpha=0.7)
    axis.set(xlabel="pulse number (up, then down)", ylabel="conductance (uS)", title="pulse response and soft-bounds fit")
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_conductance_map(conductance_us: np.ndarray, path: Path, title: str) -> Path:
    """One read of a tile's devices, as a picture (board bring-up, sanity checks)."""
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(conductance_us, cmap="viridis")
    axis.set(xlabel="column", ylabel="row", title=title)
    figure.colorbar(image, ax=axis, label="conductance (uS)")
    return _save(figure, path)
