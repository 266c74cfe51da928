"""The emulated tile: device physics + periphery + timing behind the ``Tile`` interface.

This is the reference implementation of the SoC's command set; the virtual board serves
exactly this class over the firmware protocol.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from cim_hil.config import EmulatorConfig
from cim_hil.emulator.devices import DeviceArray, write_verify_trials
from cim_hil.emulator.periphery import ADC, quantise_unsigned
from cim_hil.emulator.products import ProductPlan
from cim_hil.emulator.timing import TimingModel
from cim_hil.layer_products import Convolution, LayerCut, block_inputs, products_of_blocks, sum_row_blocks, unroll
from cim_hil.tile import Capability, Counters, ProgramResult, Tile, TileSpec, Window

def as_float32(value: float) -> float:
    """``value`` as the nearest binary32: what a board reports of it (INFO's fields are f32), so
    a host computes the same levels, scales and targets from this spec as from a board's."""
    return float(np.float32(value))


READ_FULL_SCALE_HEADROOM = 1.25  # conductance reads convert over [0, 1.25 * g_max] (ours)
MAX_KEPT_PLANS = 32


class EmulatedTile(Tile):
    def __init__(
        self, config: EmulatorConfig, generator: torch.Generator, device: torch.device,
        slot: tuple[torch.Tensor, int] | None = None,
    ) -> None:
        """``slot``: (conductances of a board's tiles (tiles, 2, rows, cols), this tile's index):
        where this tile's weight and reference conductances live; else the tile keeps its own."""
        self.config = config
        self.device = device
        self.generator = generator
        rows, cols = config.soc.rows, config.soc.cols
        dev, per = config.device, config.periphery
        capabilities = {Capability.ANALOG_PRODUCTS, Capability.PULSES, Capability.WRITE_VERIFY}
        if per.transpose:
            capabilities.add(Capability.TRANSPOSE)
        if per.reference_devices:
            capabilities.add(Capability.REFERENCE)
        self.spec = TileSpec(
            rows=rows,
            cols=cols,
            input_bits=per.input_bits,
            output_bits=per.output_bits,
            g_min_us=as_float32(dev.g_min_us),
            g_max_us=as_float32(dev.g_max_us),
            levels=dev.levels,
            v_read=as_float32(per.v_read),
            max_pulses_per_call=config.write_verify.max_pulses_per_call,
            default_tolerance_us=config.write_verify.tolerance_levels * dev.level_spacing_us,
            default_max_trials=config.write_verify.max_trials,
            capabilities=frozenset(capabilities),
        )
        self.counters = Counters(clock_hz=config.timing.clock_hz)
        self.timing = TimingModel(config.timing, per, rows, cols)
        self.slot = slot or (torch.zeros(1, 2, rows, cols, device=device), 0)
        conductances = self.slot[0][self.slot[1]]
        self.devices = DeviceArray(dev, rows, cols, generator, conductances[0])
        self.references = DeviceArray(dev, rows, cols, generator, conductances[1]) if per.reference_devices else None
        spacing = dev.level_spacing_us
        self.read_noise_us = dev.read_noise_levels * spacing
        self.programming_error_us = dev.programming_error_levels * spacing
        adc_noise = per.adc_noise_levels * spacing * per.v_read
        largest_current = per.v_read * dev.range_us
        self.forward_adc = ADC(per.output_bits, per.adc_full_scale_fraction * largest_current * rows, adc_noise)
        self.backward_adc = ADC(per.output_bits, per.adc_full_scale_fraction * largest_current * cols, adc_noise)
        self.read_full_scale_us = READ_FULL_SCALE_HEADROOM * dev.g_max_us
        self.read_lsb_us = self.read_full_scale_us / (2**per.output_bits - 1)
        # Without reference devices the periphery subtracts a fixed mid-range current.
        self.fixed_reference_us = (dev.g_min_us + dev.g_max_us) / 2
        self._kept_matrices: list | None = None
        self._kept_plans: dict[tuple, ProductPlan | None] = {}
        self._kept_fixed: tuple | None = None
        self._kept_slots: tuple | None = None

    # ---- emulator state (checkpoints) -----------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that makes this tile's future numbers: devices, references, random stream."""
        return {
            "devices": self.devices.state_dict(),
            "references": self.references.state_dict() if self.references is not None else None,
            "generator": self.generator.get_state(),
            "counters": asdict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        self.devices.load_state_dict(state["devices"])
        if self.references is not None:
            self.references.load_state_dict(state["references"])
        self.generator.set_state(state["generator"])
        self.counters = Counters(**state["counters"])

    # ---- where the conductances live --------------------------------------------------------
    @staticmethod
    def _conductances(tiles: list[EmulatedTile]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The tiles' conductances as one slice (tiles, 2, rows, cols) of their board's tensor
        and its weight and reference halves, when they are consecutive tiles of one board;
        else None."""
        group = tuple(tiles)
        kept = tiles[0]._kept_slots
        if kept is None or kept[0] != group:
            storage, first = tiles[0].slot
            consecutive = all(tile.slot[0] is storage and tile.slot[1] == first + index for index, tile in enumerate(tiles))
            both = storage[first : first + len(tiles)]
            kept = tiles[0]._kept_slots = (group, (both[:, 0], both[:, 1], both) if consecutive else None)
        return kept[1]

    # ---- products -------------------------------------------------------------------------
    @staticmethod
    def _one_chip(tiles: list[EmulatedTile]) -> bool:
        """Whether the tiles share one configuration and torch device, so one batched tensor
        operation can stand for all of them (the tiles of one board share the very objects)."""
        first = tiles[0]
        return all(tile.config is first.config and (tile.device is first.device or tile.device == first.device)
                   for tile in tiles)

    def _forward(self, x: torch.Tensor, outputs: int) -> torch.Tensor:
        return self._products_together([self], x.unsqueeze(0), [outputs], transpose=False)[0]

    def _backward(self, d: torch.Tensor, outputs: int) -> torch.Tensor:
        return self._products_together([self], d.unsqueeze(0), [outputs], transpose=True)[0]

    @classmethod
    def _products_together(
        cls, tiles: list[EmulatedTile], x: torch.Tensor, outputs: list[int], transpose: bool, normalised: bool = False
    ) -> torch.Tensor:
        """All tiles' products as one batched matrix product (see ``ProductPlan``). The plan
        for the same tiles, outputs and direction is kept on the first tile; a tile's
        configuration never changes, so neither does its verdict."""
        plan = cls._plan(tiles, outputs, transpose)
        if plan is None:
            return super()._products_together(tiles, x, outputs, transpose)
        return plan.run(x, normalised)

    @staticmethod
    def _plan(tiles: list[EmulatedTile], outputs: list[int], transpose: bool) -> ProductPlan | None:
        """The kept plan of these tiles, outputs and direction; None when they are not one chip."""
        plans = tiles[0]._kept_plans
        key = (tuple(tiles), tuple(outputs), transpose)
        if key not in plans:
            if len(plans) >= MAX_KEPT_PLANS:  # a caller that varies its output counts keeps no more than this
                plans.clear()
            plans[key] = ProductPlan(tiles, key[1], transpose) if EmulatedTile._one_chip(tiles) else None
        return plans[key]

    @classmethod
    def _layer_products(
        cls, tiles: list[EmulatedTile], cut: LayerCut, codes: torch.Tensor, convolution: Convolution | None
    ) -> torch.Tensor:
        """A layer's products as the chip computes them: the patches cut from the images (on
        the board, by the same :func:`unroll` a host uses), every tile's ADC codes, the row
        blocks' codes summed digitally, then one multiply by the LSB."""
        spec = tiles[0].spec
        plan = cls._plan(tiles, cut.outputs(spec.cols), False)
        if plan is None:
            return products_of_blocks(tiles, cut, codes, convolution)
        inputs = unroll(codes, convolution, by_column=cut.row_blocks == 1) if convolution is not None else codes
        summed = sum_row_blocks(plan.output_codes(block_inputs(inputs, cut, spec.rows)), cut)
        return summed.mul_(plan.adc.lsb)  # a view of codes made here: scaled in place

    # ---- conductances ---------------------------------------------------------------------
    def _read_array(self, array: DeviceArray, window: Window) -> torch.Tensor:
        r0, r1, c0, c1 = window
        values = array.read(self.read_noise_us)[r0:r1, c0:c1]
        self.counters.device_reads += values.numel()
        self.counters.cycles += self.timing.row_read_cycles(r1 - r0, c1 - c0)
        self.counters.energy_nj += self.timing.row_read_energy_nj(r1 - r0)
        return quantise_unsigned(values, self.spec.output_bits, self.read_full_scale_us)

    def _read_conductances(self, window: Window) -> torch.Tensor:
        return self._read_array(self.devices, window)

    def _read_reference(self) -> torch.Tensor:
        return self._read_array(self.references, (0, self.spec.rows, 0, self.spec.cols))

    def _apply_pulses(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.to(self.device)
        self.devices.pulse(counts)
        pulses = int(counts.abs().sum())
        self.counters.pulses += pulses
        self.counters.cycles += self.timing.pulse_cycles(counts)
        self.counters.energy_nj += self.timing.pulse_energy_nj(pulses)
        return counts.clone()

    def _program_verify(
        self, targets: torch.Tensor, mask: torch.Tensor, tolerance_us: float, max_trials: int, reference: bool
    ) -> ProgramResult:
        return self._program_masked([self], targets, mask, reference, tolerance_us, max_trials)

    @classmethod
    def _program_devices(
        cls, tiles: list[EmulatedTile], devices: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor,
        tolerance_us: float, max_trials: int,
    ) -> ProgramResult:
        """Write-verify of the named devices of all tiles in one set of tensor operations. Each
        array (a tile's weight or reference devices) draws its devices' programming errors and
        read noise from its tile's stream, in the order of a tile-by-tile loop, so the numbers
        do not depend on which tiles run together."""
        first = tiles[0]
        if not cls._one_chip(tiles):
            return super()._program_devices(tiles, devices, targets, reference, tolerance_us, max_trials)
        on, rows, cols = first.device, first.spec.rows, first.spec.cols
        per_array = rows * cols
        if not devices.numel():
            return ProgramResult(torch.empty(0, device=on), torch.empty(0, dtype=torch.int64, device=on),
                                 torch.empty(0, dtype=torch.bool, device=on), tolerance_us)
        devices, reference = devices.to(on), reference.to(on)
        # Array 2t holds tile t's weight devices, 2t + 1 its reference devices (the layout of
        # the board's tensor); ``key`` is each device's flat index in the stack of all arrays,
        # and sorted by it the devices come in the order of a tile-by-tile loop.
        # (2 * tile + reference) * per_array + place, where devices = tile * per_array + place
        key, order = (devices.div(per_array, rounding_mode="floor").add_(reference).mul_(per_array).add_(devices)).sort()
        counts = torch.bincount(key.div(per_array, rounding_mode="floor"), minlength=2 * len(tiles)).tolist()
        arrays = cls._arrays(tiles)
        draws = torch.cat([
            torch.randn((2, max_trials, count), generator=array.generator, device=on)
            for array, count in zip(arrays, counts) if count
        ], dim=2)
        errors, read_noise = draws
        errors.mul_(first.programming_error_us)
        read_noise.mul_(first.read_noise_us)
        both = cls._conductances(tiles)
        # Array a of the stack is slice a of the board's tensor: written in place.
        g = (torch.stack([array.g for array in arrays]) if both is None else both[2]).view(-1)
        g_min, g_max, stuck = (values.index_select(0, key) for values in cls._fixed_parameters(tiles, arrays))
        new_g, reads, taken, missed = write_verify_trials(
            g.index_select(0, key), g_min, g_max, stuck, targets.to(on).index_select(0, order), errors, read_noise,
            first._convert_read, tolerance_us,
        )
        g.index_copy_(0, key, new_g)
        if both is not None:
            DeviceArray.g_changes += 1
        else:
            for array, array_g, count in zip(arrays, g.view(len(arrays), rows, cols).unbind(0), counts):
                if count:
                    array.g = array_g
        cls._count_verify(tiles, key, taken)
        results = (torch.empty_like(values).index_copy_(0, order, values) for values in (reads, taken, missed))
        return ProgramResult(*results, tolerance_us=tolerance_us)

    @staticmethod
    def _arrays(tiles: list[EmulatedTile]) -> list[DeviceArray]:
        """Every tile's weight devices and reference devices, in that order (a tile without
        reference devices stands in its weight devices, which no reference write reaches)."""
        return [array for tile in tiles
                for array in (tile.devices, tile.references if tile.references is not None else tile.devices)]

    @staticmethod
    def _fixed_parameters(tiles: list[EmulatedTile], arrays: list[DeviceArray]) -> tuple[torch.Tensor, ...]:
        """Bounds and stuck flags of ``arrays``, each stacked flat. These change only when a
        state is loaded, so the stacks are kept on the first tile until the next load."""
        group = tuple(arrays)
        kept = tiles[0]._kept_fixed
        if kept is None or kept[0] != group or kept[1] != DeviceArray.state_loads:
            stacks = tuple(torch.stack([getattr(array, name) for array in arrays]).view(-1)
                           for name in ("g_min", "g_max", "stuck"))
            kept = tiles[0]._kept_fixed = (group, DeviceArray.state_loads, stacks)
        return kept[2]

    def _convert_read(self, conductances: torch.Tensor) -> torch.Tensor:
        return quantise_unsigned(conductances, self.spec.output_bits, self.read_full_scale_us)

    @staticmethod
    def _count_verify(tiles: list[EmulatedTile], key: torch.Tensor, trials: torch.Tensor) -> None:
        """Trial t programs and reads back every row of an array that still has a device
        pending, so a row is busy for as many trials as its slowest device; one pulse per
        pending device. ``key`` places each device: (tile, weight or reference, row, col)."""
        rows, cols = tiles[0].spec.rows, tiles[0].spec.cols
        row_trials = torch.zeros(len(tiles) * 2 * rows, dtype=torch.int64, device=trials.device)
        row_trials.scatter_reduce_(0, key.div(cols, rounding_mode="floor"), trials, reduce="amax")
        busy_rows = row_trials.view(len(tiles), 2 * rows).sum(1).tolist()
        pulses = torch.zeros(len(tiles), dtype=torch.int64, device=trials.device)
        pulses = pulses.index_add_(0, key.div(2 * rows * cols, rounding_mode="floor"), trials).tolist()
        timing = tiles[0].timing  # one chip: one timing model, whose counts are linear in rows and pulses
        per_row, per_pulse = timing.verify_trial_cycles(1), timing.pulse_energy_nj(1)
        for tile, busy, pulsed in zip(tiles, busy_rows, pulses):
            c = tile.counters
            c.cycles += busy * per_row
            c.energy_nj += pulsed * per_pulse
            c.pulses += pulsed
            c.device_reads += busy * cols
            c.verify_trials += pulsed
