"""The emulated tile: device physics + periphery + timing behind the ``Tile`` interface.

This is the reference implementation of the SoC's command set; the virtual board serves
exactly this class over the firmware protocol.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from cim_hil.config import EmulatorConfig
from cim_hil.emulator.devices import DeviceArray
from cim_hil.emulator.group import EmulatedGroup
from cim_hil.emulator.periphery import ADC, quantise_unsigned
from cim_hil.emulator.store import DeviceStore
from cim_hil.emulator.timing import TimingModel
from cim_hil.errors import UnsafeValueError
from cim_hil.group import program_masked
from cim_hil.tile import Capability, Counters, ProgramResult, Tile, TileSpec, Window


def as_float32(value: float) -> float:
    """``value`` as the nearest binary32: what a board reports of it (INFO's fields are f32), so
    a host computes the same levels, scales and targets from this spec as from a board's."""
    return float(np.float32(value))


READ_FULL_SCALE_HEADROOM = 1.25  # conductance reads convert over [0, 1.25 * g_max] (ours)
SMALLEST_ADC_FRACTION = 2.0**-12  # the least ADC full scale it can set, of the largest current (ours)


class EmulatedTile(Tile):
    """One emulated tile: its devices (``devices`` and ``references``, each a
    :class:`DeviceArray`), converters and timing model, drawing all its noise from its own
    ``generator``.

    Its device state lives in a board's :class:`DeviceStore` at ``store_index`` (or a store of
    its own); ``torch_device`` is where its tensors are computed (CPU or CUDA). A lone tile's
    calls run as a group of one, so a tile and a group of tiles share one implementation.
    """

    def __init__(
        self, config: EmulatorConfig, generator: torch.Generator, torch_device: torch.device,
        store: tuple[DeviceStore, int] | None = None,
    ) -> None:
        """``store``: (a board's device store, this tile's index in it); else the tile keeps its own."""
        self.config = config
        self.torch_device = torch_device
        self.generator = generator
        rows, cols = config.soc.rows, config.soc.cols
        dev, per = config.device, config.periphery
        capabilities = {Capability.ANALOG_PRODUCTS, Capability.PULSES, Capability.WRITE_VERIFY}
        if per.adc_range_settable:
            capabilities.add(Capability.ADC_RANGE)
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
        self.store, self.store_index = store or (DeviceStore(1, rows, cols, torch_device), 0)
        self.devices = DeviceArray(dev, rows, cols, generator, self.store.views(self.store_index, 0))
        self.references = (DeviceArray(dev, rows, cols, generator, self.store.views(self.store_index, 1))
                           if per.reference_devices else None)
        spacing = dev.level_spacing_us
        self.read_noise_us = dev.read_noise_levels * spacing
        self.programming_error_us = dev.programming_error_levels * spacing
        self.adc_noise = per.adc_noise_levels * spacing * per.v_read
        self.largest_current = per.v_read * dev.range_us  # per driven line: a device at full range
        self.forward_adc, self.backward_adc = self.power_on_adc(False), self.power_on_adc(True)
        self.read_full_scale_us = READ_FULL_SCALE_HEADROOM * dev.g_max_us
        self.read_lsb_us = self.read_full_scale_us / (2**per.output_bits - 1)
        # Without reference devices the periphery subtracts a fixed mid-range current.
        self.fixed_reference_us = (dev.g_min_us + dev.g_max_us) / 2
        self._alone = EmulatedGroup([self])

    def power_on_adc(self, transpose: bool) -> ADC:
        """The forward (transpose) ADC as the board opens: ``adc_full_scale_fraction`` of the
        largest current of all rows (columns) driven."""
        lines = self.spec.cols if transpose else self.spec.rows
        fraction = self.config.periphery.adc_full_scale_fraction
        return ADC(self.config.periphery.output_bits, fraction * self.largest_current * lines, self.adc_noise)

    def _set_adc_range(self, full_scale_ua: float | None, transpose: bool) -> float:
        """A new ADC of that full scale, anywhere from ``SMALLEST_ADC_FRACTION`` to all of the
        largest current; the groups' product plans see it and are made again."""
        if full_scale_ua is not None:
            largest = self.largest_current * (self.spec.cols if transpose else self.spec.rows)
            if not SMALLEST_ADC_FRACTION * largest <= full_scale_ua <= largest:
                raise UnsafeValueError(
                    f"ADC full scale {full_scale_ua:.6g} uA is outside what this tile can set: "
                    f"{SMALLEST_ADC_FRACTION * largest:.6g} to {largest:.6g} uA; nothing was set")
        return as_float32(self._use_adc(full_scale_ua, transpose).lsb)  # as a board reports it (SPEC.md §8.6)

    def _use_adc(self, full_scale_ua: float | None, transpose: bool) -> ADC:
        """Convert with an ADC of that full scale from now on (None: the power-on one)."""
        if full_scale_ua is None:
            adc = self.power_on_adc(transpose)
        else:
            adc = ADC(self.config.periphery.output_bits, full_scale_ua, self.adc_noise)
        if transpose:
            self.backward_adc = adc
        else:
            self.forward_adc = adc
        return adc

    # ---- emulator state (checkpoints) -----------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that makes this tile's future numbers: devices, references, random stream,
        the ADCs' full scales."""
        return {
            "devices": self.devices.state_dict(),
            "references": self.references.state_dict() if self.references is not None else None,
            "generator": self.generator.get_state(),
            "counters": asdict(self.counters),
            "adc_full_scales_ua": [self.forward_adc.full_scale, self.backward_adc.full_scale],
        }

    def load_state_dict(self, state: dict) -> None:
        self.devices.load_state_dict(state["devices"])
        if self.references is not None:
            self.references.load_state_dict(state["references"])
        self.generator.set_state(state["generator"])
        self.counters = Counters(**state["counters"])
        # A state saved before ADC ranges could be set had the power-on ones.
        for transpose, full_scale in enumerate(state.get("adc_full_scales_ua", [None, None])):
            self._use_adc(full_scale, bool(transpose))

    # ---- products -------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, outputs: int) -> torch.Tensor:
        return self._alone._products(x.unsqueeze(0), [outputs], transpose=False, in_range=False)[0]

    def _backward(self, d: torch.Tensor, outputs: int) -> torch.Tensor:
        return self._alone._products(d.unsqueeze(0), [outputs], transpose=True, in_range=False)[0]

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
        counts = counts.to(self.torch_device)
        self.devices.pulse(counts)
        pulses = int(counts.abs().sum())
        self.counters.pulses += pulses
        self.counters.cycles += self.timing.pulse_cycles(counts)
        self.counters.energy_nj += self.timing.pulse_energy_nj(pulses)
        return counts.clone()

    def _program_verify(
        self, targets: torch.Tensor, mask: torch.Tensor, tolerance_us: float, max_trials: int, reference: bool
    ) -> ProgramResult:
        return program_masked(self._alone, targets, mask, reference, tolerance_us, max_trials)

    def _convert_read(self, conductances: torch.Tensor) -> torch.Tensor:
        return quantise_unsigned(conductances, self.spec.output_bits, self.read_full_scale_us)
