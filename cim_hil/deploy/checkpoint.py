"""A run's checkpoint as the float weights a deployment programs, whichever way it was trained.

``cim-hil train --float`` checkpoints an ordinary model; ``cim-hil train`` checkpoints its
analog version, whose convolution kernels are flattened channels last and whose weights sit on
the training chip's levels. Both are read back into the ordinary model's layout; a chip-trained
model also keeps each layer's levels, so a deployment can program exactly those levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cim_hil.errors import CimHilError
from cim_hil.nn import MappingConfig
from cim_hil.training.lenet import lenet5
from cim_hil.training.trainer import CHECKPOINT, CHECKPOINT_FORMAT


@dataclass
class TrainedModel:
    """What a deployment needs from a run: the model with its trained weights, how it was
    trained, and the accuracy it had where it was trained."""

    model: nn.Module
    chip_trained: bool
    mapping: MappingConfig
    reference_accuracy: float | None  # on its training chip, or on the host for a float run
    levels: dict[str, torch.Tensor] = field(default_factory=dict)  # chip-trained: layer name -> levels
    config: dict = field(default_factory=dict)  # the run's TrainConfig, as saved
    source: str = ""


def _mapped_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _float_state(model: nn.Module, saved: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The saved analog or float state in ``model``'s own layout, or an error naming the first
    tensor that does not belong to this model."""
    expected = model.state_dict()
    state, extra = {}, set(saved) - set(expected)
    convolutions = {name for name, m in _mapped_layers(model) if isinstance(m, nn.Conv2d)}
    for key, target in expected.items():
        if key not in saved:
            raise CimHilError(f"{where} holds another model: it has no {key!r} ({tuple(target.shape)})")
        value = saved[key]
        layer, _, kind = key.rpartition(".")
        if kind == "weight" and layer in convolutions and value.ndim == 2:  # analog: (out, kh * kw * C)
            out, c, kh, kw = target.shape
            if value.shape == (out, kh * kw * c):
                value = value.view(out, kh, kw, c).permute(0, 3, 1, 2)
        if value.shape != target.shape:
            raise CimHilError(f"{where} holds another model: {key!r} is {tuple(value.shape)} there, "
                              f"{tuple(target.shape)} in this model")
        state[key] = value.detach().clone().float()
    unknown = sorted(k for k in extra if not k.endswith(".levels"))
    if unknown:
        raise CimHilError(f"{where} holds another model: it has {unknown[0]!r}, which this model lacks")
    return state


def load_trained(checkpoint: str | Path, model: nn.Module | None = None) -> TrainedModel:
    """Read a run directory (or its checkpoint file) into a :class:`TrainedModel`; ``model`` is
    the architecture to load into (default: LeNet-5, what ``cim-hil train`` trains)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CimHilError(f"no checkpoint at {path}")
    try:
        saved = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # a damaged or foreign file is the user's problem, not a traceback
        raise CimHilError(f"checkpoint {path} cannot be read: {error}") from None
    if not isinstance(saved, dict) or "model" not in saved or "config" not in saved:
        raise CimHilError(f"{path} is not a cim-hil training checkpoint")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise CimHilError(f"checkpoint {path} was written by another version of cim-hil (format "
                          f"{saved.get('format', 1)}, this one reads {CHECKPOINT_FORMAT})")
    model = model if model is not None else lenet5()
    model.load_state_dict(_float_state(model, saved["model"], f"checkpoint {path}"))
    config = saved["config"]
    chip_trained = not config.get("float_baseline", False)
    mapping = MappingConfig.model_validate(config.get("mapping", {}))
    # Deployment programs by write-verify, whatever programmed the weights during training.
    mapping = mapping.model_copy(update={"programming": "write_verify", "reference": "middle"})
    levels = {}
    if chip_trained:
        levels = {name: saved["model"][f"{name}.levels"].clone() for name, _ in _mapped_layers(model)
                  if saved["model"].get(f"{name}.levels") is not None}
    history = saved.get("history") or []
    accuracy = history[-1].get("test_acc") if history else None
    return TrainedModel(model.eval(), chip_trained, mapping, accuracy, levels, config, str(path))
