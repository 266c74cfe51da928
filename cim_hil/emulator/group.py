"""A group of an emulated board's tiles run as one batched tensor operation.

What a layer spread over many tiles costs to emulate is mostly the number of tensor
operations, so the group's products are one batched matrix product (see ``ProductPlan``) and
its writes one set of operations on the board's :class:`~cim_hil.emulator.store.DeviceStore`.
The numbers are those of the plain tile-by-tile loop (:class:`cim_hil.group.TileGroup`): each
tile draws its noise from its own stream, in the order a lone tile would.

The group owns what it keeps: the product plans and the matrices G - G_ref of its tiles, which
it computes again when the store's version says a conductance changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cim_hil.emulator.devices import write_verify_trials
from cim_hil.emulator.products import ProductPlan
from cim_hil.errors import ShapeError
from cim_hil.group import TileGroup
from cim_hil.layer_products import Convolution, LayerCut, block_inputs, products_of_blocks, sum_row_blocks, unroll
from cim_hil.tile import ProgramResult, Tile

if TYPE_CHECKING:
    from cim_hil.board import Board
    from cim_hil.emulator.tile import EmulatedTile

MAX_KEPT_PLANS = 32


class EmulatedGroup(TileGroup):
    """Tiles of one emulated chip (one store, configuration and torch device)."""

    tiles: tuple[EmulatedTile, ...]

    def __init__(self, tiles: Sequence[Tile], board: Board | None = None) -> None:
        super().__init__(tiles, board)
        first = self.tiles[0]
        self.store = first.store
        if not all(getattr(tile, "store", None) is self.store and tile.config is first.config
                   and tile.torch_device == first.torch_device for tile in self.tiles):
            raise ShapeError("an emulated group takes tiles of one emulated board")
        self.torch_device = first.torch_device
        indices = [tile.store_index for tile in self.tiles]
        self.store_indices = torch.tensor(indices, device=self.torch_device)
        # A run of consecutive tiles of the store is one slice of it: views, no copies.
        self.first = indices[0] if indices == list(range(indices[0], indices[0] + len(indices))) else None
        self._plans: dict[tuple, ProductPlan] = {}
        self._differences: dict[float, torch.Tensor] = {}  # (G - G_ref) * factor, by factor
        self._matrices_version = self.store.version

    # ---- products -------------------------------------------------------------------------
    def _products(self, x: torch.Tensor, outputs: list[int], transpose: bool, in_range: bool) -> torch.Tensor:
        if not self._one_adc_range(transpose):  # each tile converts with its own LSB: one at a time
            return super()._products(x, outputs, transpose, in_range)
        return self._plan(outputs, transpose).run(x, in_range)

    def _one_adc_range(self, transpose: bool) -> bool:
        """Whether every tile's ADC in this direction has the same full scale (``set_adc_range``)."""
        adcs = [tile.backward_adc if transpose else tile.forward_adc for tile in self.tiles]
        return all(adc.full_scale == adcs[0].full_scale for adc in adcs)

    def _layer_products(
        self, cut: LayerCut, codes: torch.Tensor, convolution: Convolution | None,
        origins: list[tuple[int, int]] | None,
    ) -> torch.Tensor:
        """A layer's products as the chip computes them: the patches cut from the images (on
        the board, by the same :func:`unroll` a host uses), every tile's ADC codes, the row
        blocks' codes summed digitally, then one multiply by the LSB. Blocks packed into
        windows run as the group's windowed products, their currents summed (the numbers packed
        layers have always had here), as do tiles whose ADCs differ (codes of different LSBs do
        not add up)."""
        if origins is not None or not self._one_adc_range(False):
            return products_of_blocks(self, cut, codes, convolution, origins)
        spec = self.spec
        plan = self._plan(cut.outputs(spec.cols), False)
        inputs = unroll(codes, convolution, by_column=cut.row_blocks == 1) if convolution is not None else codes
        summed = sum_row_blocks(plan.output_codes(block_inputs(inputs, cut, spec.rows)), cut)
        return summed.mul_(plan.adc.lsb)  # a view of codes made here: scaled in place

    def _plan(self, outputs: list[int], transpose: bool) -> ProductPlan:
        first = self.tiles[0]
        adc = first.backward_adc if transpose else first.forward_adc
        key = (tuple(outputs), transpose, adc.full_scale)  # a plan converts with the ADC it was made for
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_KEPT_PLANS:  # a caller that varies its output counts keeps no more than this
                self._plans.clear()
            plan = self._plans[key] = ProductPlan(self, key[0], transpose)
        return plan

    def _matrices(self, factor: float) -> torch.Tensor:
        """(G - G_ref) * ``factor`` of the tiles, (tiles, rows, cols): a forward and a transpose
        product share it. Computed again into the same tensor when a conductance changed, so
        views of it stay current."""
        version = self.store.version
        if version != self._matrices_version:
            for kept_factor, matrices in self._differences.items():
                self._difference(kept_factor, out=matrices)
            self._matrices_version = version
        if factor not in self._differences:
            if len(self._differences) >= MAX_KEPT_PLANS:  # one per ADC range tried: no more than this
                self._differences.clear()
            self._differences[factor] = self._difference(factor)
        return self._differences[factor]

    def _difference(self, factor: float, out: torch.Tensor | None = None) -> torch.Tensor:
        store, first = self.store, self.tiles[0]
        both = store.g[self.first : self.first + len(self)] if self.first is not None else store.g[self.store_indices]
        reference = both[:, 1] if first.references is not None else first.fixed_reference_us
        return torch.sub(both[:, 0], reference, out=out).mul_(factor)

    # ---- programming ----------------------------------------------------------------------
    def _program_places(
        self, places: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor, tolerance_us: float,
        max_trials: int,
    ) -> ProgramResult:
        """Write-verify of the named devices of all tiles in one set of tensor operations. Each
        array (a tile's weight or reference devices) draws its devices' programming errors and
        read noise from its tile's stream, in the order of a tile-by-tile loop, so the numbers
        do not depend on which tiles run together."""
        first, on = self.tiles[0], self.torch_device
        per_array = first.spec.rows * first.spec.cols
        if not places.numel():
            return ProgramResult(torch.empty(0, device=on), torch.empty(0, dtype=torch.int64, device=on),
                                 torch.empty(0, dtype=torch.bool, device=on), tolerance_us)
        places, reference = places.to(on), reference.to(on)
        # Array 2t holds tile t's weight devices, 2t + 1 its reference devices (the layout of
        # the store); ``key`` is each device's flat index in the stack of the group's arrays,
        # and sorted by it the devices come in the order of a tile-by-tile loop:
        # (2 * tile + reference) * per_array + place, where places = tile * per_array + place.
        key, order = (places.div(per_array, rounding_mode="floor").add_(reference).mul_(per_array).add_(places)).sort()
        counts = torch.bincount(key.div(per_array, rounding_mode="floor"), minlength=2 * len(self)).tolist()
        generators = (tile.generator for tile in self.tiles for _ in range(2))
        draws = torch.cat([
            torch.randn((2, max_trials, count), generator=generator, device=on)
            for generator, count in zip(generators, counts) if count
        ], dim=2)
        errors, read_noise = draws
        errors.mul_(first.programming_error_us)
        read_noise.mul_(first.read_noise_us)
        stored = self._store_places(key, per_array)
        state = self.store
        g = state.g.view(-1)
        g_min, g_max, stuck = (values.view(-1).index_select(0, stored) for values in (state.g_min, state.g_max, state.stuck))
        new_g, reads, taken, missed = write_verify_trials(
            g.index_select(0, stored), g_min, g_max, stuck, targets.to(on).index_select(0, order), errors, read_noise,
            first._convert_read, tolerance_us,
        )
        g.index_copy_(0, stored, new_g)
        self._count_verify(key, taken)
        results = (torch.empty_like(values).index_copy_(0, order, values) for values in (reads, taken, missed))
        return ProgramResult(*results, tolerance_us=tolerance_us)

    def _store_places(self, key: torch.Tensor, per_array: int) -> torch.Tensor:
        """The devices ``key`` names in the group's arrays, as flat indices into the store."""
        if self.first is not None:
            return key + 2 * self.first * per_array
        array = key.div(per_array, rounding_mode="floor")
        tile = self.store_indices.index_select(0, array.div(2, rounding_mode="floor"))
        return (tile.mul(2).add_(array % 2)).mul_(per_array).add_(key % per_array)

    def _count_verify(self, key: torch.Tensor, trials: torch.Tensor) -> None:
        """Trial t programs and reads back every row of an array that still has a device
        pending, so a row is busy for as many trials as its slowest device; one pulse per
        pending device. ``key`` places each device: (tile, weight or reference, row, col)."""
        rows, cols = self.spec.rows, self.spec.cols
        row_trials = torch.zeros(len(self) * 2 * rows, dtype=torch.int64, device=trials.device)
        row_trials.scatter_reduce_(0, key.div(cols, rounding_mode="floor"), trials, reduce="amax")
        busy_rows = row_trials.view(len(self), 2 * rows).sum(1).tolist()
        pulses = torch.zeros(len(self), dtype=torch.int64, device=trials.device)
        pulses = pulses.index_add_(0, key.div(2 * rows * cols, rounding_mode="floor"), trials).tolist()
        timing = self.tiles[0].timing  # one chip: one timing model, whose counts are linear in rows and pulses
        per_row, per_pulse = timing.verify_trial_cycles(1), timing.pulse_energy_nj(1)
        for tile, busy, pulsed in zip(self.tiles, busy_rows, pulses):
            c = tile.counters
            c.cycles += busy * per_row
            c.energy_nj += pulsed * per_pulse
            c.pulses += pulsed
            c.device_reads += busy * cols
            c.verify_trials += pulsed
