"""Mixed precision without accumulation, the reference chip's control experiment: a device is
programmed when one step's update reaches the granularity, and the remainder of chi is dropped
after each write, so updates smaller than epsilon are lost (at most 77.8 % on LeNet against
97.73 % with accumulation, arXiv:2305.14547)."""

from __future__ import annotations

import torch

from cim_hil.training.optimizer import MixedPrecisionOptimizer


class NoAccumulationOptimizer(MixedPrecisionOptimizer):
    def _program(self, analog, updates: dict[int, torch.Tensor]):
        programmed, commit = super()._program(analog, updates)
        weights = [w for w in analog.weights if id(w) in updates]

        def commit_and_drop() -> None:
            commit()
            if weights:
                state = analog.state
                chosen = state.index_of(weights)
                state.write({"chi": torch.zeros_like(state.read("chi", chosen)), "writes": state.read("writes", chosen)},
                            chosen, weights, self.state)

        return programmed, commit_and_drop
