"""The emulated tile: device physics + periphery + timing behind the ``Tile`` interface.

This is the reference implementation of the SoC's command set; the virtual board serves
exactly this class over the firmware protocol.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from cim_hil.config import EmulatorConfig
from cim_hil.emulator.devices import DeviceArray
from cim_hil.emulator.periphery import ADC, quantise_input, quantise_unsigned
from cim_hil.emulator.timing import TimingModel
from cim_hil.tile import Capability, Counters, ProgramResult, Tile, TileSpec, Window

READ_FULL_SCALE_HEADROOM = 1.25  # conductance reads convert over [0, 1.25 * g_max] (ours)


class EmulatedTile(Tile):
    def __init__(self, config: EmulatorConfig, generator: torch.Generator, device: torch.device) -> None:
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
            g_min_us=dev.g_min_us,
            g_max_us=dev.g_max_us,
            levels=dev.levels,
            v_read=per.v_read,
            max_pulses_per_call=config.write_verify.max_pulses_per_call,
            capabilities=frozenset(capabilities),
        )
        self.counters = Counters(clock_hz=config.timing.clock_hz)
        self.timing = TimingModel(config.timing, per, rows, cols)
        self.devices = DeviceArray(dev, rows, cols, generator)
        self.references = DeviceArray(dev, rows, cols, generator) if per.reference_devices else None
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

    @property
    def default_tolerance_us(self) -> float:
        return self.config.write_verify.tolerance_levels * self.config.device.level_spacing_us

    @property
    def default_max_trials(self) -> int:
        return self.config.write_verify.max_trials

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

    # ---- products -------------------------------------------------------------------------
    def _weights(self) -> torch.Tensor:
        reference = self.references.g if self.references is not None else self.fixed_reference_us
        return self.devices.g - reference

    def _product(self, x: torch.Tensor, matrix: torch.Tensor, adc: ADC) -> torch.Tensor:
        codes = quantise_input(x.to(self.device, torch.float32), self.spec.input_bits)
        currents = self.spec.v_read * (codes @ matrix)
        # Fresh read noise on every device of a product adds, per output, a Gaussian whose std
        # is sigma_read * |input| (exact in distribution, no noise matrix per sample); the ADC's
        # own Gaussian noise adds in quadrature, so one draw serves both.
        devices_per_weight = 2 if self.references is not None else 1
        read_std = self.spec.v_read * self.read_noise_us * math.sqrt(devices_per_weight)
        if read_std or adc.noise:
            std = torch.sqrt((read_std * codes.norm(dim=1, keepdim=True)) ** 2 + adc.noise**2)
            currents = currents + std * torch.randn(currents.shape, generator=self.generator, device=self.device)
        return adc.convert(currents)

    def _count_products(self, batch: int, outputs: int, transpose: bool) -> None:
        c = self.counters
        c.cycles += self.timing.product_cycles(batch, outputs)
        c.energy_nj += self.timing.product_energy_nj(batch)
        if transpose:
            c.transpose_products += batch
        else:
            c.products += batch

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x, self._weights(), self.forward_adc)
        self._count_products(x.shape[0], self.spec.cols, transpose=False)
        return y

    def _backward(self, d: torch.Tensor) -> torch.Tensor:
        y = self._product(d, self._weights().T, self.backward_adc)
        self._count_products(d.shape[0], self.spec.rows, transpose=True)
        return y

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
        array = self.references if reference else self.devices
        targets, pending = targets.to(self.device), mask.to(self.device)
        trials = torch.zeros(targets.shape, dtype=torch.int64, device=self.device)
        reached = torch.full(targets.shape, float("nan"), device=self.device)
        for _ in range(max_trials):
            if not pending.any():
                break
            array.write_trial(targets, pending, self.programming_error_us)
            trials += pending.to(torch.int64)
            readback = quantise_unsigned(array.read(self.read_noise_us), self.spec.output_bits, self.read_full_scale_us)
            reached = torch.where(pending, readback, reached)
            rows_pending = int(pending.any(dim=1).sum())
            self.counters.cycles += self.timing.verify_trial_cycles(rows_pending)
            pulses = int(pending.sum())  # one programming pulse per pending device this trial
            self.counters.energy_nj += self.timing.pulse_energy_nj(pulses)
            self.counters.pulses += pulses
            self.counters.device_reads += rows_pending * self.spec.cols
            pending = pending & ((readback - targets).abs() > tolerance_us)
        self.counters.verify_trials += int(trials.sum())
        return ProgramResult(reached_us=reached, trials=trials, failed=pending, tolerance_us=tolerance_us)
