"""What the algorithms that train on the devices themselves share: their analog layers
(open-loop pulse mappings), plain SGD for the digital parameters, a random stream of their own
for stochastic rounding and choppers, and counters of what they did to the chip.

The analog weights take the plain gradient, as SGD on the arrays does (no moments: a rule like
Adam needs per-weight state that a crossbar update cannot carry). ``layer.weight`` is the
host's nominal copy (pulses applied times the pulse step), which the backward pass uses where
the tiles have no transpose products.
"""

from __future__ import annotations

import torch
from torch import nn

from cim_hil.errors import ConfigError
from cim_hil.nn.convert import analog_layers
from cim_hil.nn.layers import AnalogLayer
from cim_hil.training.algorithms.config import AlgorithmConfig

TOTALS = ("pulses_a", "pulses_c", "transfer_reads", "transfers")


class PulsedOptimizer(torch.optim.Optimizer):
    """Base of the on-device algorithms; subclasses implement ``_analog_step``."""

    def __init__(self, model: nn.Module, lr: float, options: AlgorithmConfig | None = None, seed: int = 0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(model.parameters(), dict(lr=lr))
        self.options = options or AlgorithmConfig()
        self._layers: dict[int, AnalogLayer] = {id(layer.weight): layer for layer in analog_layers(model)}
        for layer in self._layers.values():
            if layer.levels is not None:
                raise ConfigError(f"{type(self).__name__} programs devices by pulses: set mapping.programming = 'pulses'")
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.totals = dict.fromkeys(TOTALS, 0)
        self.last_step = {"devices_programmed": 0}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        analog, digital = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) in self._layers:
                    analog.append((self._layers[id(p)], p.grad, group["lr"]))
                else:
                    digital.append((p, group["lr"]))
        programmed = self._analog_step(analog) if analog else 0
        for p, lr in digital:
            p.add_(p.grad, alpha=-lr)
        self.steps += 1
        self.last_step = {"devices_programmed": programmed}
        return loss

    def _analog_step(self, analog: list[tuple[AnalogLayer, torch.Tensor, float]]) -> int:
        """Update the analog layers from (layer, gradient, lr); returns the devices pulsed."""
        raise NotImplementedError

    def _pulse_weights(self, layer: AnalogLayer, counts: torch.Tensor) -> torch.Tensor:
        """Signed pulse counts (out, in) on a layer's weight devices (C); the host's nominal
        copy follows what the tiles applied, which is returned."""
        applied = layer.mapping.program_pulses(counts)
        layer.weight.view(-1).add_(applied.view(-1).to(layer.weight.dtype), alpha=layer.granularity)
        self.totals["pulses_c"] += int(applied.abs().sum())
        return applied

    def write_statistics(self) -> dict[str, float]:
        """Pulses on A and on the weights C, per analog weight and in all, and the devices read
        for transfers."""
        weights = sum(layer.weight.numel() for layer in self._layers.values())
        per = max(weights, 1)
        return {**self.totals, "analog_weights": weights, "pulses_a_per_weight": self.totals["pulses_a"] / per,
                "pulses_c_per_weight": self.totals["pulses_c"] / per,
                "pulses_per_weight": (self.totals["pulses_a"] + self.totals["pulses_c"]) / per}

    def state_dict(self):
        state = super().state_dict()
        state["pulsed"] = {"steps": self.steps, "totals": dict(self.totals), "generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        own = state_dict.pop("pulsed")
        super().load_state_dict(state_dict)
        self.steps, self.totals = own["steps"], dict(own["totals"])
        self.generator.set_state(own["generator"])
