"""Converters around the array: the input DAC and the output ADC.

The host sees only what these return: inputs snapped to DAC codes (``cim_hil.codes``, shared
with the serial driver and the firmware), outputs snapped to ADC codes (saturating at full
scale), with the ADC's input-referred noise.
"""

from __future__ import annotations

import torch

from cim_hil.codes import top_code


class ADC:
    """A signed ADC with ``bits`` bits (sign included) and a symmetric full scale.

    ``noise`` is its input-referred Gaussian noise std; the tile adds it together with the
    array's read noise in one draw, before conversion.
    """

    def __init__(self, bits: int, full_scale: float, noise: float) -> None:
        self.top_code = top_code(bits)
        self.full_scale = full_scale
        self.lsb = full_scale / self.top_code
        self.noise = noise

    def convert_lsbs_(self, analog_lsbs: torch.Tensor, code_value: torch.Tensor | None = None) -> torch.Tensor:
        """Snap a signal given in LSBs to the ADC's codes and return the values they stand for,
        in place (products are large; no copy). The tile computes its products in LSBs, so
        conversion needs no division. ``code_value``, if given, is what one code stands for
        output by output (the LSB, or zero where a tile converts no output)."""
        return self.codes_(analog_lsbs).mul_(self.lsb if code_value is None else code_value)

    def codes_(self, analog_lsbs: torch.Tensor) -> torch.Tensor:
        """The output codes of a signal given in LSBs, in place: rounded, saturating at full scale."""
        return analog_lsbs.round_().clamp_(-self.top_code, self.top_code)


def quantise_unsigned(values: torch.Tensor, bits: int, full_scale: float) -> torch.Tensor:
    """Conductance reads through an unsigned ``bits``-bit conversion over [0, full_scale]."""
    lsb = full_scale / (2**bits - 1)
    return values.clamp(0.0, full_scale).div_(lsb).round_().mul_(lsb)
