"""Products of a group of emulated tiles as one batched tensor operation.

A layer asks for products of the same tiles, in the same direction and with the same output
counts, on every step. Everything that depends only on those (converters, noise constants,
the slice of the conductance matrices, the cycle counts) is worked out once, in a
:class:`ProductPlan`, so a product pays only for its tensor work: in LeNet's small layers the
tensors are tiny and the cost is mostly the number of operations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cim_hil.codes import input_codes, top_code

if TYPE_CHECKING:
    from cim_hil.emulator.group import EmulatedGroup

# The matrix product runs on at least this many columns: CPU kernels for fewer are several
# times slower.
MIN_PRODUCT_COLUMNS = 16


class ProductPlan:
    """Products of a ``group``'s tiles in one direction, tile i converting its first
    ``outputs[i]`` outputs.

    Products are computed in the ADC's LSBs: one input code on one device makes
    (G - G_ref) * v_read / top uA, and the matrices carry that factor over the LSB. Fresh
    read noise on every device of a product adds, per output, a Gaussian whose std is
    sigma_read * |input| (exact in distribution, no noise matrix per sample); the ADC's own
    Gaussian noise adds in quadrature, so one draw serves both. Each tile's draws come from
    its own generator, as a lone product would draw them, so the numbers do not depend on
    which tiles run together.
    """

    def __init__(self, group: EmulatedGroup, outputs: tuple[int, ...], transpose: bool) -> None:
        tiles = group.tiles
        first = tiles[0]
        spec = first.spec
        self.group, self.tiles, self.outputs, self.transpose = group, tiles, outputs, transpose
        self.torch_device = first.torch_device
        self.generators = [tile.generator for tile in tiles]
        self.input_bits = spec.input_bits
        self.adc = adc = first.backward_adc if transpose else first.forward_adc
        self.widest = max(outputs)
        self.columns = min(max(self.widest, MIN_PRODUCT_COLUMNS), spec.rows if transpose else spec.cols)
        top = top_code(spec.input_bits)
        self.factor = spec.v_read / (top * adc.lsb)
        devices_per_weight = 2 if first.references is not None else 1
        read_std = spec.v_read * first.read_noise_us * math.sqrt(devices_per_weight) / (top * adc.lsb)
        self.read_variance, self.adc_variance = read_std**2, (adc.noise / adc.lsb) ** 2
        # What one ADC code stands for, and zero beyond a tile's outputs (one multiply for both).
        narrow = min(outputs) < self.widest
        self.code_value = None
        if narrow:
            on = self.torch_device
            converted = torch.arange(self.widest, device=on) < torch.tensor(outputs, device=on).view(-1, 1, 1)
            self.code_value = converted.float().mul_(adc.lsb)
        # Cycles and energy are linear in the batch: per sample, tile by tile.
        self.cycles = [first.timing.product_cycles(1, width) for width in outputs]
        self.energy_nj = first.timing.product_energy_nj(1)
        self._matrices: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (matrices, driven inputs, their cut)

    def run(self, x: torch.Tensor, in_range: bool) -> torch.Tensor:
        """Currents (tiles, batch, max(outputs)) for inputs ``x`` (tiles, batch, k); inputs
        known to lie in [-1, 1] (``in_range``) are not clamped."""
        codes = input_codes(x.to(self.torch_device, torch.float32), self.input_bits, clamp=not in_range)
        return self.adc.convert_lsbs_(self._analog_lsbs(codes, owned=True), self.code_value)

    def output_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The ADC's output codes (tiles, batch, max(outputs)) for input codes (tiles, batch, k),
        whole numbers as float32; beyond a tile's outputs they are not defined."""
        return self.adc.codes_(self._analog_lsbs(codes.to(self.torch_device, torch.float32), owned=False))

    def _analog_lsbs(self, codes: torch.Tensor, owned: bool) -> torch.Tensor:
        """The products with their noise, in LSBs, before conversion; counts the products.
        ``owned`` codes are used up (squared in place)."""
        lsbs = torch.bmm(codes, self._matrices_for(codes.shape[2]))
        if self.widest < self.columns:
            lsbs = lsbs[:, :, : self.widest]
        if self.read_variance or self.adc_variance:
            # (A sum of squares, not ``norm``: torch's norm is far slower on column-major inputs.)
            squares = codes.square_() if owned else codes.square()
            variance = squares.sum(2, keepdim=True).mul_(self.read_variance).add_(self.adc_variance)
            lsbs = torch.addcmul(lsbs, variance.sqrt_(), self._noise(lsbs.shape[1]))
        else:
            lsbs = lsbs.contiguous()
        self._count(lsbs.shape[1])
        return lsbs

    def _matrices_for(self, driven: int) -> torch.Tensor:
        """The tiles' matrices cut to ``driven`` inputs and the product's columns (transposed
        for a transpose product): a view, kept while the matrices are refreshed in place."""
        matrices = self.group._matrices(self.factor)
        kept = self._matrices
        if kept is None or kept[0] is not matrices or kept[1] != driven:
            if self.transpose:
                cut = matrices[:, : self.columns, :driven].transpose(1, 2)
            else:
                cut = matrices[:, :driven, : self.columns]
            kept = self._matrices = (matrices, driven, cut)
        return kept[2]

    def _noise(self, batch: int) -> torch.Tensor:
        """Standard normal draws (tiles, batch, max(outputs)), tile i's from its own stream as a
        lone (batch, outputs[i]) draw, zero beyond its outputs."""
        widest = self.widest
        narrow = self.code_value is not None
        noise = (torch.zeros if narrow else torch.empty)(len(self.tiles), batch, widest, device=self.torch_device)
        for generator, width, draws in zip(self.generators, self.outputs, noise):
            if width == widest:
                draws.normal_(generator=generator)
            else:
                draws[:, :width] = torch.randn((batch, width), generator=generator, device=draws.device)
        return noise

    def _count(self, batch: int) -> None:
        energy = batch * self.energy_nj
        for tile, cycles in zip(self.tiles, self.cycles):
            c = tile.counters
            c.cycles += batch * cycles
            c.energy_nj += energy
            if self.transpose:
                c.transpose_products += batch
            else:
                c.products += batch
