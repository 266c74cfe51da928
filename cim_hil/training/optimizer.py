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
from collections.abc import Callable
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
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``agree``: data-parallel replicas pass what their devices took through it and record
        what it returns, the same on every replica (``ProcessGroupWorld.agree``)."""
        if rule not in ("sgd", "adam"):
            raise ValueError(f"rule must be 'sgd' or 'adam', got {rule!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        defaults = dict(lr=lr, rule=rule, betas=betas, eps=eps, momentum=momentum)
        super().__init__(model.parameters(), defaults)
        self._layers = {id(layer.weight): layer for layer in analog_layers(model)}
        self._agree = agree
        self._programmers: dict[tuple[int, ...], StepProgrammer] = {}  # by the layers a step updates
        self._flat: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # see _flat_state
        self.steps = 0
        self.last_step = {"devices_programmed": 0}

    def _rule(self, index: int, group: dict, params: list[torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        """The updates -lr * (rule's step) of a group's ``params``, end to end in one flat
        tensor, and how to move the rule's state once the step has succeeded (until then it is
        computed aside, so a failed step leaves it as it was). The rule runs on the flat
        gradient and flat states, so a step costs the same few operations however many
        parameters the model has."""
        lr = group["lr"]
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        steps = [self.state[p].get("step", 0) + 1 for p in params]

        def flat(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
            return self._flat_state(("rule", index, name), params, name, torch.float32)

        if group["rule"] == "sgd":
            names = ("momentum_buffer",) if group["momentum"] else ()
            flats = [flat(name) for name in names]
            # A buffer starts at zero, so the first step's is the gradient itself, as in torch's SGD.
            new = [flats[0][0].mul(group["momentum"]).add_(grad)] if names else []
            update = (new[0] if names else grad).mul(-lr)
        else:
            names = ("exp_avg", "exp_avg_sq")
            flats = [flat(name) for name in names]
            beta1, beta2 = group["betas"]
            new = [torch.lerp(flats[0][0], grad, 1 - beta1), flats[1][0].mul(beta2).addcmul_(grad, grad, value=1 - beta2)]
            # Adam with bias correction, as torch.optim.Adam computes it.
            denom = new[1].sqrt().div_(self._per_step(steps, params, lambda step: math.sqrt(1 - beta2**step)))
            update = new[0].div(denom.add_(group["eps"]))
            update.mul_(self._per_step(steps, params, lambda step: -lr / (1 - beta1**step)))

        def commit() -> None:
            for name, (joined, views), values in zip(names, flats, new):
                joined.copy_(values)
                for p, view in zip(params, views):
                    self.state[p][name] = view
            for p, step in zip(params, steps):
                self.state[p]["step"] = step

        return update, commit

    @staticmethod
    def _per_step(steps: list[int], params: list[torch.Tensor], factor: Callable[[int], float]) -> float | torch.Tensor:
        """``factor`` of each parameter's step count: one number when they share it (always, unless
        some parameter went without a gradient in some step), else one per element."""
        if all(step == steps[0] for step in steps):
            return factor(steps[0])
        values = torch.tensor([factor(step) for step in steps], dtype=torch.float32)
        return values.repeat_interleave(torch.tensor([p.numel() for p in params]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        commits, digital, analog = [], [], {}
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            update, commit = self._rule(index, group, params)
            commits.append(commit)
            for p, piece in zip(params, update.split([p.numel() for p in params])):
                if id(p) in self._layers:
                    analog[id(p)] = piece
                else:
                    digital.append((p, piece.view_as(p)))
        programmed = self._program(analog) if analog else 0  # if the board fails here, no state has changed
        if digital:
            torch._foreach_add_([p for p, _ in digital], [update for _, update in digital])
        for commit in commits:
            commit()
        self.steps += 1
        self.last_step = {"devices_programmed": programmed}
        return loss

    def _program(self, analog: dict[int, torch.Tensor]) -> int:
        """Accumulate the analog weights' flat updates (by the weight's id) in chi, program every
        weight whose |chi| reached epsilon (all layers in one go), then take what the devices
        took off chi and count the writes. Works on one flat vector of all the weights, so a
        step costs the same few operations however many layers there are. Returns how many
        devices were programmed."""
        key = tuple(index for index in self._layers if index in analog)  # in the model's order
        if key not in self._programmers:
            self._programmers[key] = StepProgrammer([self._layers[index] for index in key], self._agree)
        programmer = self._programmers[key]
        params = [layer.weight for layer in programmer.layers]
        chi_state, chi_views = self._flat_state(("chi",), params, "chi", torch.float32)
        writes_state, writes_views = self._flat_state(("writes",), params, "writes", torch.int64)
        chi = torch.cat([analog[id(p)] for p in params]).add_(chi_state)
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
        for p, chi_view, writes_view in zip(params, chi_views, writes_views):
            self.state[p].update(chi=chi_view, writes=writes_view)
        return programmed

    def _flat_state(self, key: tuple, params: list[torch.Tensor], name: str,
                    dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """State ``name`` of ``params``, flat and end to end (zero before a parameter's first
        step), and views of it shaped like the parameters, kept under ``key``. The states are
        those views from the first step on, so a step updates one tensor in place; a state that
        is not (a loaded one) is joined again."""
        states = [self.state[p].get(name) for p in params]
        flat, views = self._flat.get(key, (None, []))
        if len(views) != len(states) or any(state is not view for state, view in zip(states, views)):
            flat, views = join_flat([state if state is not None else torch.zeros_like(p, dtype=dtype)
                                     for state, p in zip(states, params)])
            self._flat[key] = (flat, views)
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
