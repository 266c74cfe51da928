"""Plain analog SGD: every step, each weight's device gets its update -lr * gradient as pulses
(expected counts rounded stochastically, ``pulses.py``); no accumulator on the host. On
asymmetric devices the weights drift to each device's symmetry point (the bias zero-shifting
removes, by referencing each device to its own symmetry point: ``mapping.reference =
"calibrated"``)."""

from __future__ import annotations

import torch

from cim_hil.nn.layers import AnalogLayer
from cim_hil.training.algorithms.pulsed import PulsedOptimizer
from cim_hil.training.algorithms.pulses import stochastic_counts


class AnalogSGD(PulsedOptimizer):
    def _analog_step(self, analog: list[tuple[AnalogLayer, torch.Tensor, float]]) -> int:
        programmed = 0
        for layer, grad, lr in analog:
            counts = stochastic_counts(grad.float() * (-lr / layer.granularity), self.generator, self.options.max_pulses)
            programmed += int((self._pulse_weights(layer, counts) != 0).sum())
        return programmed
