"""The mixed-precision updater: SGD or Adam (``cim_hil.training.rules``) turns gradients into
updates; for analog weights the update is accumulated in a full-precision chi per device, and a
device is programmed only where |chi| reaches the programming granularity epsilon
(../shared/DOMAIN.md):

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

import itertools
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from cim_hil.errors import CimHilError
from cim_hil.nn.convert import analog_layers
from cim_hil.nn.layers import AnalogLayer
from cim_hil.nn.programming import StepProgrammer
from cim_hil.training import rules

Rule = Literal["sgd", "adam"]
Commit = Callable[[], None]
RULE_STATE = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """The algorithm above for a model made by ``convert_to_analog``, with ``rule`` (Adam with
    ``betas`` and ``eps``, or SGD with ``momentum``) at learning rate ``lr``.

    The state is torch.optim's, per parameter: ``step`` and the rule's moments, and for an
    analog weight ``chi`` and ``writes`` (how often each device was programmed). Each state
    is a view of one flat tensor the optimizer allocates at the start (per parameter group,
    per weight store), so a step moves it in one operation however many parameters there are;
    a loaded state is copied into them.
    """

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
        self._layers = analog_layers(model)
        self._rule_states = [
            _FlatState(group["params"], {name: torch.float32 for name in _rule_names(group)})
            for group in self.param_groups
        ]
        self._analog = [_AnalogState(store_layers, agree) for store_layers in _by_store(self._layers)]
        self._analog_weights = {id(layer.weight) for layer in self._layers}
        self.steps = 0
        self.last_step = {"devices_programmed": 0}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        # The rule's updates, computed aside: nothing moves until every device is programmed.
        steps = [self._rule(index, group) for index, group in enumerate(self.param_groups)]
        analog, digital = {}, []
        for params, update, _ in filter(None, steps):
            for p, piece in zip(params, update.split([p.numel() for p in params])):
                if id(p) in self._analog_weights:
                    analog[id(p)] = piece
                else:
                    digital.append((p, piece.view_as(p)))
        programs = [self._program(state, analog) for state in self._analog]  # a board failing here changes no state
        # Every device is programmed: from here on the step cannot fail, and the states move.
        for _, commit in programs:
            commit()
        if digital:
            torch._foreach_add_([p for p, _ in digital], [update for _, update in digital])
        for _, _, commit in filter(None, steps):
            commit()
        self.steps += 1
        self.last_step = {"devices_programmed": sum(programmed for programmed, _ in programs)}
        return loss

    def _rule(self, index: int, group: dict) -> tuple[list[torch.Tensor], torch.Tensor, Commit] | None:
        """The updates of the group's parameters that have a gradient, end to end in one flat
        tensor, and how to keep the rule's new state once the step has succeeded."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        state = self._rule_states[index]
        chosen = state.index_of(params)
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        steps = [self.state[p].get("step", 0) + 1 for p in params]
        step = steps[0] if all(s == steps[0] for s in steps) else torch.cat(
            [torch.full((p.numel(),), s) for p, s in zip(params, steps)])
        old = {name: state.read(name, chosen) for name in state.flat}
        lr = group["lr"]
        if group["rule"] == "sgd":
            update, buffer = rules.sgd(grad, old.get("momentum_buffer"), lr, group["momentum"])
            new = {"momentum_buffer": buffer} if buffer is not None else {}
        else:
            update, exp_avg, exp_avg_sq = rules.adam(grad, old["exp_avg"], old["exp_avg_sq"], step, lr,
                                                     group["betas"], group["eps"])
            new = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

        def commit() -> None:
            state.write(new, chosen, params, self.state)
            for p, count in zip(params, steps):
                self.state[p]["step"] = count

        return params, update, commit

    def _program(self, analog: _AnalogState, updates: dict[int, torch.Tensor]) -> tuple[int, Commit]:
        """The mixed-precision step of one weight store's weights that have an update: returns
        how many devices were programmed and how to keep the new state."""
        weights = [w for w in analog.weights if id(w) in updates]
        if not weights:
            return 0, lambda: None
        state, programmer = analog.state, analog.programmer
        chosen = state.index_of(weights)  # the weights' flat indices in the store (None: all of them)
        granularity = programmer.granularity if chosen is None else programmer.granularity.index_select(0, chosen)
        chi = torch.cat([updates[id(w)] for w in weights]).add_(state.read("chi", chosen))  # chi += update
        ratio = chi / granularity
        due = (ratio.abs() >= 1).nonzero().squeeze(1)  # due where |chi| >= epsilon
        programmed, commit_store = torch.zeros(0, dtype=torch.bool), lambda: None
        if due.numel():
            in_store = due if chosen is None else chosen.index_select(0, due)
            applied, programmed, commit_store = programmer.program(in_store, ratio.index_select(0, due).round_().to(torch.int64))
            chi.index_add_(0, due, applied, alpha=-1)  # chi -= what the devices took

        def commit() -> None:
            commit_store()  # the host's weights (and levels) follow the devices
            writes = state.read("writes", chosen).index_add_(0, due, programmed.to(torch.int64))
            state.write({"chi": chi, "writes": writes}, chosen, weights, self.state)

        return int(programmed.sum()), commit

    def write_statistics(self) -> dict[str, float]:
        """Programming events per analog weight, and the reduction against writing every
        weight on every step (what plain SGD on the devices would do)."""
        counts = [self.state[layer.weight]["writes"].flatten() for layer in self._layers
                  if "writes" in self.state[layer.weight]]
        weights = sum(layer.weight.numel() for layer in self._layers)
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
        for flat in [*self._rule_states, *(analog.state for analog in self._analog)]:
            flat.adopt(self.state)


def _rule_names(group: dict) -> tuple[str, ...]:
    names = RULE_STATE[group["rule"]]
    return names if group["rule"] == "adam" or group["momentum"] else ()


class _FlatState:
    """State ``names`` (with their dtypes) of ``params``: one flat tensor per name, zero at the
    start, parameter after parameter; ``state[p][name]`` is p's view of it once p has stepped."""

    def __init__(self, params: list[torch.Tensor], names: dict[str, torch.dtype]) -> None:
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.position = {id(p): at for at, p in enumerate(self.params)}
        self.flat = {name: torch.zeros(sum(self.sizes), dtype=dtype) for name, dtype in names.items()}
        self.views = {name: [piece.view_as(p) for piece, p in zip(flat.split(self.sizes), self.params)]
                      for name, flat in self.flat.items()}

    def index_of(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The flat indices of ``params`` (some of ours, in our order); None for all of them."""
        if len(params) == len(self.params):
            return None
        starts = [0, *itertools.accumulate(self.sizes)]
        return torch.cat([torch.arange(starts[at], starts[at] + self.sizes[at])
                          for at in (self.position[id(p)] for p in params)])

    def read(self, name: str, chosen: torch.Tensor | None) -> torch.Tensor:
        """State ``name`` of the ``chosen`` elements: the flat tensor itself for all (None),
        else a copy."""
        flat = self.flat[name]
        return flat if chosen is None else flat.index_select(0, chosen)

    def write(self, values: dict[str, torch.Tensor], chosen: torch.Tensor | None, params: list[torch.Tensor],
              state: dict) -> None:
        """Keep new ``values`` of the ``chosen`` elements, which belong to ``params``."""
        for name, new in values.items():
            flat = self.flat[name]
            if chosen is None:
                if new is not flat:
                    flat.copy_(new)
            else:
                flat.index_copy_(0, chosen, new)
            for p in params:
                state[p][name] = self.views[name][self.position[id(p)]]

    def adopt(self, state: dict) -> None:
        """Take a loaded ``state`` (torch's load gives it new tensors) into the flat tensors."""
        for name, flat in self.flat.items():
            flat.zero_()
            for p, view in zip(self.params, self.views[name]):
                if name in state.get(p, {}):
                    view.copy_(state[p][name])
                    state[p][name] = view


class _AnalogState:
    """The optimizer's side of one weight store: its programmer, and chi and writes of its weights."""

    def __init__(self, layers: list[AnalogLayer], agree: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.weights = [layer.weight for layer in layers]
        self.programmer = StepProgrammer(layers[0].stored.store, agree)
        self.state = _FlatState(self.weights, {"chi": torch.float32, "writes": torch.int64})


def _by_store(layers: list[AnalogLayer]) -> list[list[AnalogLayer]]:
    """The layers of each weight store, in the store's order; every layer of a store must be here."""
    stores: dict[int, list[AnalogLayer]] = {}
    for layer in layers:
        stores.setdefault(id(layer.stored.store), []).append(layer)
    for store_layers in stores.values():
        store_layers.sort(key=lambda layer: layer.stored.index)
        if len(store_layers) != len(store_layers[0].stored.store.shapes):
            raise CimHilError("the optimizer needs every analog layer that convert_to_analog made with these: "
                              "give it the whole converted model")
    return list(stores.values())
