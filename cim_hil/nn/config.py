"""How logical weights map onto devices and how they are programmed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cim_hil.config import Strict


class MappingConfig(Strict):
    """Weight-to-conductance mapping of one analog layer.

    ``write_verify``: each weight's device sits on one of the tile's levels; the host keeps the
    level and programs a new one with write-verify (the reference chip). ``pulses``: open-loop
    signed pulse counts of nominal size ``pulse_step_us`` (soft-bounds devices).
    """

    programming: Literal["write_verify", "pulses"] = "write_verify"
    differential: bool = Field(
        False, description="W = (G+ - G-) * scale, G- on the reference devices (write_verify only)"
    )
    weight_fill: float = Field(
        0.6, gt=0.0, le=1.0, description="largest initial |W| as a fraction of the weight range"
    )
    granularity_levels: int = Field(1, ge=1, description="levels per programming step (write_verify)")
    pulse_step_us: float | None = Field(
        None, gt=0.0, description="nominal conductance change of one pulse; default: a level spacing"
    )
    reference: Literal["middle", "calibrated"] = Field(
        "middle",
        description="pulses: program references to mid-range, or keep them as calibration "
        "(zero-shift) left them and program weights relative to each device's reference",
    )
    backward: Literal["auto", "analog", "digital"] = Field(
        "auto", description="transpose products on the tile, or on the host from its weight copy"
    )
