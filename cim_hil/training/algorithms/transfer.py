"""Tiki-Taka v2, chopped TTv2 and AGAD (Gokmen 2021; Rasch et al. 2023, arXiv:2303.04721), as
aihwkit's compounds implement them, on tiles through the Tile interface only.

Every step the fast array A takes the SGD update as pulses, each input's column multiplied by
its chopper sign c_k (+1 always for TTv2): A += -lr * grad * c. Every ``transfer_every`` steps
the next ``transfer_columns`` columns k of A are read (one row read per tile, ``FastArray``)
and accumulated in a digital buffer H per weight, in pulses of C:

    TTv2, c-TTv2:  H[:, k] += transfer_lr * c_k * (A[:, k] - ref[:, k]) * scale / epsilon_C
    AGAD:          H[:, k] += transfer_lr * c_k * (A[:, k] - p_k) * scale / epsilon_C

Where |H| >= ``threshold``, round(H) pulses (at most ``max_transfer_pulses``) go to C, the
layer's weights, and H is forgotten (or reduced by what was applied). The forward and backward
products use C alone (gamma = 0). TTv2 needs A's references at each device's symmetry point,
where A decays to under the pulses: an offset there adds a constant to every read, which H
accumulates into C. c-TTv2 flips c_k with chance ``in_chop_prob`` after each read of column k,
so the gradient's part of A keeps its sign in c_k * A while an offset's alternates and
averages out. AGAD flips regularly, every round(1 / in_chop_prob) reads, and needs no reference
devices: p_k, A's column at the last flip, is the running mean of that column's reads at the
end of the period before (weighted to the period's tail), so the reads count only what A moved
since, whatever the devices' symmetry points.

C integrates A, which integrates the gradient: what damps C is A's decay to its symmetry
points, and A decays only as fast as it is pulsed. So A wants to be fast (its lr, the
optimizer's, well above plain SGD's) and the buffer slow (a small ``transfer_lr``); with a slow
A the family is a nearly undamped double integrator and overshoots SGD's path.
"""

from __future__ import annotations

import torch
from torch import nn

from cim_hil.errors import CapabilityError, ConfigError
from cim_hil.nn.layers import AnalogLayer
from cim_hil.tile import Capability
from cim_hil.training.algorithms.config import TRANSFER, AlgorithmConfig
from cim_hil.training.algorithms.fast_array import FastArray
from cim_hil.training.algorithms.pulsed import PulsedOptimizer
from cim_hil.training.algorithms.pulses import stochastic_counts

TAIL_WEIGHT = 0.5  # AGAD: each read's weight in the running mean of a chopper period (ours)


class TransferOptimizer(PulsedOptimizer):
    def __init__(self, model: nn.Module, arrays: list[FastArray], lr: float, algorithm: str = "c-ttv2",
                 options: AlgorithmConfig | None = None, seed: int = 0) -> None:
        if algorithm not in TRANSFER:
            raise ConfigError(f"algorithm must be one of {', '.join(TRANSFER)}, got {algorithm!r}")
        super().__init__(model, lr, options, seed)
        self.algorithm = algorithm
        self.arrays = {id(array.layer.weight): array for array in arrays}
        if set(self.arrays) != set(self._layers):
            raise ConfigError("give one fast array A for every analog layer of the model")
        if algorithm != "agad":
            for array in arrays:
                if not array.tiles[0].spec.supports(Capability.REFERENCE):
                    raise CapabilityError(f"{algorithm} reads A against its reference devices, which these tiles "
                                          "lack; use agad, which needs none")
        if self.algorithm == "agad" and self.options.in_chop_prob == 0:
            raise ConfigError("agad needs in_chop_prob > 0: its reference is taken at the chopper's flips")

    @property
    def chopped(self) -> bool:
        return self.algorithm != "ttv2"

    def _state(self, array: FastArray) -> dict:
        """A layer's algorithm state, begun at its first step: there A's references are measured
        (TTv2, c-TTv2) or A is brought to its symmetry points (AGAD). All floating tensors
        (torch casts a state to its parameter's dtype on loading)."""
        state = self.state[array.layer.weight]
        if "buffer" not in state:
            out, inputs = array.shape
            state["buffer"] = torch.zeros(out, inputs)
            state["chopper"] = torch.ones(inputs)
            state["next_column"] = torch.zeros(())
            if self.algorithm == "agad":
                array.settle(self.options.settle_pairs)
                self.totals["pulses_a"] += 2 * self.options.settle_pairs * len(array.tiles) * array.rows * array.cols
                state["reference"] = torch.zeros(out, inputs)  # p_k
                state["has_reference"] = torch.zeros(inputs)
                state["period_mean"] = torch.zeros(out, inputs)
                state["period_reads"] = torch.zeros(inputs)
            else:
                state["reference"] = array.read_references(self.options.reference_reads)
        return state

    def _analog_step(self, analog: list[tuple[AnalogLayer, torch.Tensor, float]]) -> int:
        options = self.options
        programmed = 0
        transfer = self.steps % options.transfer_every == 0
        for layer, grad, lr in analog:
            array = self.arrays[id(layer.weight)]
            state = self._state(array)
            expected = grad.float() * state["chopper"] * (-lr / array.granularity)
            applied = array.apply_pulses(stochastic_counts(expected, self.generator, options.max_pulses))
            self.totals["pulses_a"] += int(applied.abs().sum())
            if transfer:
                programmed += self._transfer(layer, array, state)
        return programmed

    def _transfer(self, layer: AnalogLayer, array: FastArray, state: dict) -> int:
        """Read the next columns of A into H and pulse C where |H| reached the threshold."""
        options = self.options
        inputs = array.shape[1]
        first = int(state["next_column"])
        columns = [(first + i) % inputs for i in range(min(options.transfer_columns, inputs))]
        state["next_column"].fill_((first + len(columns)) % inputs)
        index = torch.tensor(columns)
        reads = array.read_columns(columns)
        self.totals["transfer_reads"] += reads.numel()
        chopper = state["chopper"][index]
        if self.algorithm == "agad":
            signal = self._agad_signal(state, index, reads)
        else:
            signal = reads - state["reference"][:, index]
        buffer = state["buffer"][:, index] + signal * chopper * (options.transfer_lr * array.scale / layer.granularity)
        due = buffer.abs() >= options.threshold
        pulses = torch.where(due, buffer.round().clamp(-options.max_transfer_pulses, options.max_transfer_pulses),
                             0.0).to(torch.int64)
        programmed = 0
        if due.any():
            counts = torch.zeros(array.shape, dtype=torch.int64)
            counts[:, index] = pulses
            applied = self._pulse_weights(layer, counts)[:, index]
            self.totals["transfers"] += int((applied != 0).sum())
            programmed = int((applied != 0).sum())
            buffer = torch.where(due, 0.0, buffer) if options.forget_buffer else buffer - applied
        state["buffer"][:, index] = buffer
        self._flip(state, index)
        return programmed

    def _agad_signal(self, state: dict, index: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """What A's columns moved since their last flip; the first read of a column sets p_k."""
        has = state["has_reference"][index].bool()
        reference = torch.where(has, state["reference"][:, index], reads)
        state["reference"][:, index] = reference
        state["has_reference"][index] = 1.0
        count = state["period_reads"][index]
        mean = torch.where(count > 0, torch.lerp(state["period_mean"][:, index], reads, TAIL_WEIGHT), reads)
        state["period_mean"][:, index] = mean
        state["period_reads"][index] = count + 1
        return reads - reference

    def _flip(self, state: dict, index: torch.Tensor) -> None:
        """The choppers of the columns just read: c-TTv2 flips each with chance in_chop_prob;
        AGAD flips at the end of each period, and its reference becomes the period's mean."""
        if not self.chopped:
            return
        if self.algorithm == "agad":
            period = max(1, round(1 / self.options.in_chop_prob))
            flip = state["period_reads"][index] >= period
            flipped = index[flip]
            state["reference"][:, flipped] = state["period_mean"][:, flipped]
            state["period_reads"][flipped] = 0.0
        else:
            flip = torch.rand(len(index), generator=self.generator) < self.options.in_chop_prob
            flipped = index[flip]
        state["chopper"][flipped] *= -1

    def state_dict(self):
        state = super().state_dict()
        state["pulsed"]["algorithm"] = self.algorithm
        return state

    def load_state_dict(self, state_dict):
        algorithm = state_dict["pulsed"].get("algorithm")
        if algorithm != self.algorithm:
            raise ConfigError(f"the optimizer state is {algorithm}'s, this optimizer runs {self.algorithm}")
        super().load_state_dict(state_dict)
