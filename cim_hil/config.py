"""Validated configuration of the emulated SoC: device physics, periphery, timing, geometry.

Defaults are the reference chip's numbers (../shared/DOMAIN.md, arXiv:2305.14547); where a
number is ours it says so. Every model forbids unknown fields, so a typo in a TOML file is an
error naming the field rather than a silently ignored setting.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cim_hil.errors import ConfigError


class Strict(BaseModel):
    """The base of every cim-hil model: unknown fields are errors, values never change after
    validation (a typo in a config file is reported, not ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConductanceRange(Strict):
    """A model with a conductance range [g_min_us, g_max_us] that must not be empty; each
    subclass gives the fields its own defaults and bounds."""

    g_min_us: float
    g_max_us: float

    @model_validator(mode="after")
    def _range_not_empty(self) -> "ConductanceRange":
        if self.g_max_us <= self.g_min_us:
            raise ValueError(
                f"empty conductance range: g_max_us ({self.g_max_us}) must exceed "
                f"g_min_us ({self.g_min_us})"
            )
        return self


class DeviceConfig(ConductanceRange):
    """One memristor population: conductance range, soft-bounds pulse response, noise.

    Noise figures are in units of the spacing between adjacent programmable levels
    (the "sigma" of the reference chip's simulations).
    """

    g_min_us: float = Field(7.6, ge=0.0, description="lowest programmable conductance (uS)")
    g_max_us: float = Field(31.3, gt=0.0, description="highest programmable conductance (uS)")
    levels: int = Field(16, ge=2, description="programmable levels between g_min and g_max")
    step_up_us: float = Field(
        1.6, gt=0.0, description="soft-bounds a_up: up-pulse step at the lower bound (uS, ours)"
    )
    step_down_us: float = Field(
        1.6, gt=0.0, description="soft-bounds a_down: down-pulse step at the upper bound (uS, ours)"
    )
    step_d2d: float = Field(0.1, ge=0.0, description="device-to-device relative std of steps")
    bounds_d2d: float = Field(0.02, ge=0.0, description="device-to-device relative std of bounds")
    step_c2c: float = Field(0.1, ge=0.0, description="cycle-to-cycle relative std of each step")
    read_noise_levels: float = Field(0.3, ge=0.0, description="read noise std, in level spacings")
    programming_error_levels: float = Field(
        0.5, ge=0.0, description="write-verify landing error std, in level spacings"
    )
    stuck_fraction: float = Field(0.0, ge=0.0, le=1.0, description="fraction of stuck devices")
    relaxation_tau_s: float = Field(
        1.0, gt=0.0, allow_inf_nan=False,
        description="relaxation's time constant: a device t s after its last write is log10(1 + t/tau) decades on (s, ours)",
    )
    relaxation_drift: float = Field(
        0.02, ge=0.0, allow_inf_nan=False,
        description="relaxation drift: the distance to the relaxed conductance shrinks by exp(-drift) per decade (ours)",
    )
    relaxation_target: float = Field(
        0.5, ge=0.0, le=1.0, description="the relaxed conductance, as a fraction of a device's range above g_min (ours)"
    )
    relaxation_spread_levels: float = Field(
        0.3, ge=0.0, allow_inf_nan=False,
        description="relaxation spread: std after one decade, in level spacings; it grows as sqrt(decades) (ours)",
    )

    @property
    def range_us(self) -> float:
        return self.g_max_us - self.g_min_us

    @property
    def level_spacing_us(self) -> float:
        return self.range_us / (self.levels - 1)


class PeripheryConfig(Strict):
    """DACs, ADCs and what the array periphery can do."""

    input_bits: int = Field(8, ge=2, le=24, description="DAC bits, sign included")
    output_bits: int = Field(8, ge=2, le=24, description="ADC bits, sign included")
    v_read: float = Field(0.1, gt=0.0, le=0.5, description="read voltage (V)")
    adc_full_scale_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="ADC full scale as a fraction of the largest possible column current (ours)",
    )
    adc_noise_levels: float = Field(
        2.0, ge=0.0, description="ADC input-referred noise std, in level spacings at v_read"
    )
    cols_per_adc: int = Field(8, ge=1, description="columns sharing one TIA + ADC")
    adc_range_settable: bool = Field(
        True, description="the host can set each tile's ADC full scale (Tile.set_adc_range); else it stays at "
        "adc_full_scale_fraction"
    )
    transpose: bool = Field(
        False, description="array supports transpose (backward) products; the reference chip has none and computes "
        "gradients on the host"
    )
    reference_devices: bool = Field(True, description="each device has a reference device")


class TimingConfig(Strict):
    """The timing and energy model; every figure is one row of the README's timing table."""

    clock_hz: float = Field(100e6, gt=0.0)
    input_pulse_cycles: int = Field(1, ge=1, description="one bit-serial input pulse")
    conversion_cycles: int = Field(1, ge=1, description="one ADC conversion")
    row_select_cycles: int = Field(2, ge=0, description="switching drivers to a new row (ours)")
    program_pulse_cycles: int = Field(10, ge=1, description="one SET/RESET pulse, 100 ns (ours)")
    energy_per_product_nj: float = Field(2.66, ge=0.0, description="one tile product, one sample")
    energy_per_pulse_nj: float = Field(0.01, ge=0.0, description="one programming pulse (ours)")


class WriteVerifyConfig(Strict):
    """Defaults for program-with-verify."""

    tolerance_levels: float = Field(0.5, gt=0.0, description="accepted |read - target|, levels")
    max_trials: int = Field(20, ge=1, description="pulse+verify trials before giving up")
    max_pulses_per_call: int = Field(
        1000, ge=1, description="safety cap on |pulses| one device may get in one call"
    )


class SoCConfig(Strict):
    """Geometry: how many tiles and how large."""

    tiles: int = Field(4, ge=1, le=4096)
    rows: int = Field(64, ge=1, le=8192)
    cols: int = Field(64, ge=1, le=8192)
    first_tile: int = Field(
        0, ge=0, description="this emulator's tiles are tiles first_tile.. of a larger chip of the same seed (each "
        "tile's devices and noise come from its index's stream): emulated tiles beside a board in a composite board"
    )


class EmulatorConfig(Strict):
    """Everything the cycle-accurate emulator needs; the default is the reference SoC."""

    soc: SoCConfig = SoCConfig()
    device: DeviceConfig = DeviceConfig()
    periphery: PeripheryConfig = PeripheryConfig()
    timing: TimingConfig = TimingConfig()
    write_verify: WriteVerifyConfig = WriteVerifyConfig()
    seed: int = Field(0, ge=0)
    torch_device: Literal["cpu", "cuda", "auto"] = "cpu"

    @model_validator(mode="after")
    def _adc_groups_fit(self) -> "EmulatorConfig":
        if self.periphery.cols_per_adc > max(self.soc.rows, self.soc.cols):
            raise ValueError(
                f"periphery.cols_per_adc ({self.periphery.cols_per_adc}) exceeds the tile size"
            )
        return self


class LinkConfig(Strict):
    """The serial link to a board (../firmware_protocol/SPEC.md §3): line rate and patience."""

    baudrate: int = Field(921600, gt=0, description="line rate, bits per second (8N1: 10 bits per byte)")
    response_timeout_s: float = Field(
        0.5, gt=0.0, le=60.0, description="wait for an answer beyond the frames' transfer time, per try"
    )
    retries: int = Field(5, ge=0, le=100, description="re-sends of one frame (same seq) before giving up")


Model = TypeVar("Model", bound=BaseModel)


def format_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the dotted field path."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{where}: {item['msg']}")
    return "; ".join(lines)


def validate(model: type[Model], data: dict) -> Model:
    """Build ``model`` from ``data``, turning pydantic's error into a :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid {model.__name__}: {format_validation_error(error)}") from None


def load_config(path: str | Path, model: type[Model] = EmulatorConfig) -> Model:  # type: ignore[assignment]
    """Read a TOML or JSON file into ``model``, with errors that name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                          f"offset {error.start})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {error}") from None
    try:
        return validate(model, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
