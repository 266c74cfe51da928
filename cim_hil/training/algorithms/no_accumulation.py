"""Mixed precision without accumulation, the reference chip's control experiment: a device is
programmed when one step's update reaches the granularity, and the remainder of chi is dropped
after each write, so updates smaller than epsilon are lost (at most 77.8 % on LeNet against
97.73 % with accumulation, arXiv:2305.14547)."""

from __future__ import annotations

import torch

from cim_hil.training.optimizer import MixedPrecisionOptimizer


class NoAccumulationOptimizer(MixedPrecisionOptimizer):
    def _program(self, analog: dict[int, torch.Tensor]) -> int:
        programmed = super()._program(analog)
        for layer in self._layers.values():
            chi = self.state[layer.weight].get("chi")
            if chi is not None:
                chi.zero_()
        return programmed
