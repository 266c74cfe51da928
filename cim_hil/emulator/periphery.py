"""Converters around the array: the input DAC and the output ADC.

The host sees only what these return: inputs snapped to DAC codes, outputs snapped to ADC
codes (saturating at full scale), with the ADC's input-referred noise.
"""

from __future__ import annotations

import torch


def top_code(bits: int) -> int:
    """The largest code of a signed converter with ``bits`` bits, sign included."""
    return 2 ** (bits - 1) - 1


def input_codes(x: torch.Tensor, bits: int, clamp: bool = True) -> torch.Tensor:
    """Inputs in [-1, 1] as the nearest signed DAC codes (SPEC.md §4.2 sends exactly these);
    beyond it the DAC saturates (``clamp``: the caller may know there is no beyond)."""
    top = top_code(bits)
    return (x.clamp(-1.0, 1.0).mul_(top) if clamp else x.mul(top)).round_()


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
