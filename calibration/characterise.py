"""Device characterisation: pulse-response curves and a per-device soft-bounds fit.

From the soft-bounds model, each pulse changes G linearly in G:
    up:   dG = a_up/S * G_max - a_up/S * G        (S = G_max - G_min)
    down: dG = a_down/S * G_min - a_down/S * G
so a straight-line fit of dG against G on the up sweep and on the down sweep gives, per device,
rate and bound of each direction, and from them a_up, a_down, G_min, G_max. The scatter about
the line is the cycle-to-cycle noise (read noise included). The fit can be exported as an
emulator configuration, so the emulator behaves like the chip on the bench.
"""

from __future__ import annotations

import torch
from pydantic import Field
from tqdm import tqdm

from calibration.results import CalibrationResult, ResultMetadata
from cim_hil.config import DeviceConfig, EmulatorConfig, Strict, validate
from cim_hil.errors import UnsafeValueError
from cim_hil.tile import Capability, Tile, averaged_read


class CharacterisationConfig(Strict):
    pulses: int = Field(40, ge=2, description="N: N up pulses, then N down pulses, a read after each")
    reads: int = Field(2, ge=1, description="reads averaged per point")
    reset_pulses: int = Field(120, ge=0, description="down pulses first, to start near G_min")


def pulse_response(tile: Tile, config: CharacterisationConfig | None = None, progress: bool = True) -> torch.Tensor:
    """Conductance after each pulse: (2N + 1, rows, cols), starting from the reset state."""
    config = config or CharacterisationConfig()
    if not tile.spec.supports(Capability.PULSES):
        raise UnsafeValueError("characterisation needs a tile that takes programming pulses")
    shape = (tile.spec.rows, tile.spec.cols)
    remaining = config.reset_pulses
    while remaining > 0:
        chunk = min(remaining, tile.spec.max_pulses_per_call)
        tile.apply_pulses(torch.full(shape, -chunk, dtype=torch.int64))
        remaining -= chunk
    one = torch.ones(shape, dtype=torch.int64)
    curve = [averaged_read(tile.read_conductances, config.reads)]
    for step in tqdm(range(2 * config.pulses), desc="pulse response", disable=not progress, leave=False):
        tile.apply_pulses(one if step < config.pulses else -one)
        curve.append(averaged_read(tile.read_conductances, config.reads))
    return torch.stack(curve)


def _line_fit(g: torch.Tensor, dg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per device, dg = intercept - rate * g by least squares; returns intercept, rate, residual std."""
    g_mean, dg_mean = g.mean(0), dg.mean(0)
    var = ((g - g_mean) ** 2).mean(0)
    cov = ((g - g_mean) * (dg - dg_mean)).mean(0)
    rate = -cov / var.clamp(min=1e-12)
    intercept = dg_mean + rate * g_mean
    residual = (dg - (intercept - rate * g)).std(0)
    return intercept, rate, residual


MOVED_SCATTERS = 4.0
"""How far beyond the scatter of its single steps a sweep's net change must go to count."""


def responds_to_pulses(curve: torch.Tensor) -> torch.Tensor:
    """Per device, whether N up pulses raised it and N down pulses lowered it by more than
    ``MOVED_SCATTERS`` times the scatter of its single steps. A stuck device's net change over a
    sweep is only the read noise of two reads, about the scatter of one step, so it never counts
    as fitted, however its noise happens to fall; an ideal stuck device (no noise) moves by 0."""
    n = (curve.shape[0] - 1) // 2
    scatter = (curve[1:] - curve[:-1]).std(0)
    rise, fall = curve[n] - curve[0], curve[n] - curve[-1]
    return (rise > MOVED_SCATTERS * scatter) & (fall > MOVED_SCATTERS * scatter)


def fit_soft_bounds(curve: torch.Tensor) -> dict[str, torch.Tensor]:
    n = (curve.shape[0] - 1) // 2
    up_i, up_r, up_res = _line_fit(curve[:n], curve[1 : n + 1] - curve[:n])
    down_i, down_r, down_res = _line_fit(curve[n:-1], curve[n + 1 :] - curve[n:-1])
    g_max, g_min = up_i / up_r, down_i / down_r
    span = g_max - g_min
    a_up, a_down = up_r * span, down_r * span
    fitted = responds_to_pulses(curve) & (up_r > 0) & (down_r > 0) & (span > 0)
    mean_step = (curve[1:] - curve[:-1]).abs().mean(0).clamp(min=1e-12)
    nan = torch.tensor(float("nan"))
    return {
        "a_up_us": torch.where(fitted, a_up, nan),
        "a_down_us": torch.where(fitted, a_down, nan),
        "g_min_us": torch.where(fitted, g_min, nan),
        "g_max_us": torch.where(fitted, g_max, nan),
        "noise_rel": torch.where(fitted, (up_res + down_res) / 2 / mean_step, nan),
        "fitted": fitted,
    }


def characterise(tile: Tile, config: CharacterisationConfig | None = None, progress: bool = True,
                 tile_index: int = 0, board_info: dict | None = None) -> CalibrationResult:
    config = config or CharacterisationConfig()
    curve = pulse_response(tile, config, progress)
    fit = fit_soft_bounds(curve)
    ok = fit["fitted"]

    def stats(name: str) -> dict[str, float]:
        values = fit[name][ok]
        return {"median": float(values.median()), "mean": float(values.mean()), "std": float(values.std())}

    summary = {"devices": int(ok.numel()), "fitted": int(ok.sum()), "not_responding": int((~ok).sum())}
    if int(ok.sum()) > 1:
        summary.update({name: stats(name) for name in ("a_up_us", "a_down_us", "g_min_us", "g_max_us", "noise_rel")})
    metadata = ResultMetadata(kind="characterisation", board=board_info or {}, tile=tile_index,
                              settings=config.model_dump(), summary=summary)
    arrays = {"curve_us": curve.numpy(), **{k: v.numpy() for k, v in fit.items()}}
    return CalibrationResult(metadata, arrays)


def emulator_config_from_fit(result: CalibrationResult, base: EmulatorConfig | None = None) -> EmulatorConfig:
    """An emulator configuration whose device population matches the fitted one."""
    base = base or EmulatorConfig()
    s = result.metadata.summary
    if "a_up_us" not in s:
        raise UnsafeValueError(
            f"no device model can be fitted: {s.get('not_responding', s['devices'] - s['fitted'])} of {s['devices']} "
            "devices did not respond to pulses beyond their read noise (stuck, or not connected)"
        )
    steps = [s["a_up_us"], s["a_down_us"]]
    device = {
        **base.device.model_dump(),
        "g_min_us": s["g_min_us"]["median"],
        "g_max_us": s["g_max_us"]["median"],
        "step_up_us": s["a_up_us"]["median"],
        "step_down_us": s["a_down_us"]["median"],
        "step_d2d": sum(x["std"] / x["mean"] for x in steps) / 2,
        "bounds_d2d": (s["g_min_us"]["std"] / s["g_min_us"]["mean"] + s["g_max_us"]["std"] / s["g_max_us"]["mean"]) / 2,
        "step_c2c": s["noise_rel"]["median"],
    }
    return validate(EmulatorConfig, {**base.model_dump(), "device": validate(DeviceConfig, device).model_dump()})
