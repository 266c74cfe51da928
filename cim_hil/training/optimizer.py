"""The mixed-precision updater: SGD or Adam turns gradients into updates; for analog weights
the update is accumulated in a full-precision chi per device, and a device is programmed only
where |chi| reaches the programming granularity epsilon (../shared/DOMAIN.md):

    chi += update
    where |chi| >= epsilon: program round(chi / epsilon) steps
    chi -= the weight change the devices actually took

so an update is never lost and never applied twice, whatever a device refuses. Digital
parameters (biases) take the update directly.

A step changes nothing until every analog layer's devices are programmed: the updates are
computed aside, all layers are programmed in one go (one write-verify call per step), and only
then do chi, the rule's state, the host's weights and the biases move. If the board fails
midway (a refused command, a pulled cable), the optimizer and the model keep their state from
before the step; the tiles programmed before the failure may hold one step more than the host
knows, and a resume re-writes the devices from the host's copy (``Trainer.resume``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from cim_hil.nn.convert import analog_layers
from cim_hil.nn.programming import StepProgrammer, join_flat

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
        self._programmers: dict[tuple[int, ...], StepProgrammer] = {}  # by the layers a step updates
        self._flat: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # by state name: see _flat_state
        self.steps = 0
        self.last_step = {"devices_programmed": 0}

    @staticmethod
    def _directions(grads: list[torch.Tensor], states: list[dict], group: dict) -> tuple[list[torch.Tensor], list[dict]]:
        """The updates -lr * (rule's step) for a group's parameters, and the rule's new states
        (computed aside, so a failed step leaves the old states as they were). Each operation
        runs over the whole list (torch's ``_foreach`` kernels, as torch's own optimizers use),
        so a step costs the same few calls however many parameters the model has."""
        lr = group["lr"]
        if group["rule"] == "sgd":
            if not group["momentum"]:
                return torch._foreach_mul(grads, -lr), [{} for _ in grads]
            buffers = [
                grad.clone() if "momentum_buffer" not in state else state["momentum_buffer"] * group["momentum"] + grad
                for grad, state in zip(grads, states)
            ]
            return torch._foreach_mul(buffers, -lr), [{"momentum_buffer": buffer} for buffer in buffers]
        beta1, beta2 = group["betas"]
        steps = [state.get("step", 0) + 1 for state in states]
        def moments(name: str) -> list[torch.Tensor]:  # zero before a parameter's first step
            return [state[name] if name in state else torch.zeros_like(grad) for grad, state in zip(grads, states)]

        m = torch._foreach_lerp(moments("exp_avg"), grads, 1 - beta1)
        v = torch._foreach_mul(moments("exp_avg_sq"), beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        # Adam with bias correction, as torch.optim.Adam computes it.
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**step) for step in steps])
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(m, denom)
        torch._foreach_mul_(updates, [-lr / (1 - beta1**step) for step in steps])
        return updates, [{"step": step, "exp_avg": a, "exp_avg_sq": b} for step, a, b in zip(steps, m, v)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        new_states, digital, analog = [], [], {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates, states = self._directions([p.grad for p in params], [self.state[p] for p in params], group)
            for p, update, new_state in zip(params, updates, states):
                new_states.append((p, new_state))
                if id(p) in self._layers:
                    analog[id(p)] = (p, update, new_state)
                else:
                    digital.append((p, update))
        programmed = self._program(analog) if analog else 0  # if the board fails here, no state has changed
        if digital:
            torch._foreach_add_([p for p, _ in digital], [update for _, update in digital])
        for p, new_state in new_states:
            self.state[p].update(new_state)
        self.steps += 1
        self.last_step = {"devices_programmed": programmed}
        return loss

    def _program(self, analog: dict[int, tuple[torch.Tensor, torch.Tensor, dict]]) -> int:
        """Accumulate the analog weights' updates in chi, program every weight whose |chi|
        reached epsilon (all layers in one go), and put chi and the write counts, less what the
        devices took, into the new states. Works on one flat vector of all the weights, so a
        step costs the same few operations however many layers there are. Returns how many
        devices were programmed."""
        key = tuple(index for index in self._layers if index in analog)  # in the model's order
        if key not in self._programmers:
            self._programmers[key] = StepProgrammer([self._layers[index] for index in key])
        programmer = self._programmers[key]
        entries = [analog[id(layer.weight)] for layer in programmer.layers]
        chi_state, chi_views = self._flat_state(entries, "chi", torch.float32)
        writes_state, writes_views = self._flat_state(entries, "writes", torch.int64)
        chi = torch.cat([update.view(-1) for _, update, _ in entries]).add_(chi_state)
        ratio = chi / programmer.granularity
        due = (ratio.abs() >= 1).nonzero().squeeze(1)  # the weights whose chi reached epsilon
        programmed = 0
        if due.numel():
            applied, was_programmed = programmer.program(due, ratio.index_select(0, due).round_().to(torch.int64))
            chi.index_add_(0, due, applied, alpha=-1)
            # Every device is programmed: from here on the step cannot fail, and the states move.
            writes_state.index_add_(0, due, was_programmed.to(torch.int64))
            programmed = int(was_programmed.sum())
        chi_state.copy_(chi)
        for name, views in (("chi", chi_views), ("writes", writes_views)):
            for (_, _, new_state), view in zip(entries, views):
                new_state[name] = view
        return programmed

    def _flat_state(self, entries: list[tuple[torch.Tensor, torch.Tensor, dict]], name: str,
                    dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """State ``name`` of every entry's parameter, flat and end to end (zero before its first
        step), and views of it shaped like the parameters. The states are those views from the
        first step on, so a step updates one tensor in place; a state that is not (a loaded
        one) is joined again."""
        states = [self.state[p].get(name) for p, _, _ in entries]
        flat, views = self._flat.get(name, (None, []))
        if len(views) != len(states) or any(state is not view for state, view in zip(states, views)):
            flat, views = join_flat([state if state is not None else torch.zeros_like(p, dtype=dtype)
                                     for state, (p, _, _) in zip(states, entries)])
            self._flat[name] = (flat, views)
        return flat, views

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
        for state in self.state.values():  # torch casts every floating parameter's state to its dtype
            if "writes" in state:
                state["writes"] = state["writes"].to(torch.int64)
