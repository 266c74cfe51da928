"""The mixed-precision updater: SGD or Adam turns gradients into updates; for analog weights
the update is accumulated in a full-precision chi per device, and a device is programmed only
where |chi| reaches the programming granularity epsilon (../shared/DOMAIN.md):

    chi += update
    where |chi| >= epsilon: program round(chi / epsilon) steps
    chi -= the weight change the devices actually took

so an update is never lost and never applied twice, whatever a device refuses. Digital
parameters (biases) take the update directly.

If a board error interrupts a step (a refused command, a pulled cable), the analog weight being
programmed keeps its state from before the step; parameters earlier in the step keep their
update, since their devices took it. On a multi-tile layer the tiles programmed before the
link failed may hold one step more than the host knows; a resume re-writes the devices from
the host's copy (``Trainer.resume``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cim_hil.errors import CimHilError
from cim_hil.nn.convert import analog_layers

Rule = Literal["sgd", "adam"]


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        rule: Rule = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.0,
    ) -> None:
        if rule not in ("sgd", "adam"):
            raise ValueError(f"rule must be 'sgd' or 'adam', got {rule!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        defaults = dict(lr=lr, rule=rule, betas=betas, eps=eps, momentum=momentum)
        super().__init__(model.parameters(), defaults)
        self._layers = {id(layer.weight): layer for layer in analog_layers(model)}
        self.steps = 0
        self.last_step = {"devices_programmed": 0}

    def _direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The update -lr * (rule's step) for one parameter; keeps the rule's own state."""
        state = self.state[p]
        grad = p.grad
        if group["rule"] == "sgd":
            if group["momentum"]:
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(grad)
                grad = buf
            return -group["lr"] * grad
        beta1, beta2 = group["betas"]
        state["step"] = state.get("step", 0) + 1
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** state["step"])
        v_hat = v / (1 - beta2 ** state["step"])
        return -group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        programmed = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layer = self._layers.get(id(p))
                if layer is None:
                    p.add_(self._direction(p, group))
                    continue
                before = {key: value.clone() if torch.is_tensor(value) else value for key, value in self.state[p].items()}
                try:
                    programmed += self._accumulate_and_program(p, layer, self._direction(p, group))
                except CimHilError:
                    # The board refused or vanished: this weight's chi and rule state go back to
                    # before the step, matching its host copy, which program_steps left untouched.
                    self.state[p] = before
                    raise
        self.steps += 1
        self.last_step = {"devices_programmed": programmed}
        return loss

    def _accumulate_and_program(self, p: torch.Tensor, layer, update: torch.Tensor) -> int:
        state = self.state[p]
        chi = state.setdefault("chi", torch.zeros_like(p))
        writes = state.setdefault("writes", torch.zeros_like(p, dtype=torch.int64))
        chi.add_(update)
        epsilon = layer.granularity
        steps = torch.where(chi.abs() >= epsilon, torch.round(chi / epsilon), torch.zeros_like(chi)).to(torch.int64)
        if not steps.any():
            return 0
        applied, programmed = layer.program_steps(steps)
        chi.sub_(applied)
        writes.add_(programmed.to(torch.int64))
        return int(programmed.sum())

    def write_statistics(self) -> dict[str, float]:
        """Programming events per analog weight, and the reduction against writing every
        weight on every step (what plain SGD on the devices would do)."""
        counts = [self.state[layer.weight]["writes"].flatten() for layer in self._layers.values()
                  if "writes" in self.state[layer.weight]]
        weights = sum(layer.weight.numel() for layer in self._layers.values())
        if not counts or not weights:
            return {"writes_per_weight_mean": 0.0, "writes_per_weight_max": 0, "write_reduction": float("inf"),
                    "total_writes": 0, "analog_weights": weights}
        every = torch.cat(counts)
        total = int(every.sum())
        return {
            "writes_per_weight_mean": total / weights,
            "writes_per_weight_max": int(every.max()),
            "write_reduction": (self.steps * weights / total) if total else float("inf"),
            "total_writes": total,
            "analog_weights": weights,
        }

    def state_dict(self):
        state = super().state_dict()
        state["mixed_precision_steps"] = self.steps
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps = state_dict.pop("mixed_precision_steps", 0)
        super().load_state_dict(state_dict)
