"""The converters' codes, as both sides of the line count them (firmware_protocol/SPEC.md §4.2-4.3).

The emulator's DAC, the serial driver that sends codes to a board and the reference firmware
that receives them must agree to the bit, so the conversion lives here, in the core, once.
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
