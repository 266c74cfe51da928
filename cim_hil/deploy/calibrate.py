"""Post-training calibration of a model programmed on a target chip, without retraining.

Three steps, each switchable; the first two apply through the analog layers' mapping, the
third on the tiles:

- **Column ranges.** Each column (output) of a layer is programmed so that its largest |weight|
  uses the whole conductance range (``high`` levels from the reference), and a digital gain per
  column (``output_scale`` = 1 / the column's analog gain) brings its output back. A column
  whose weights are small then spans many levels instead of a few, so the devices' programming
  error, read noise and the ADC's noise weigh less against its signal.
- **Input ranges.** Each layer's DAC gets one fixed full scale instead of each sample's peak.
  The rule: among candidate ranges (quantiles of the |inputs| seen on the calibration batches,
  from the 0.9th to the largest, and fractions of the largest), take the one that minimises the
  mean squared error that the DAC (clipping plus rounding to its codes) causes in the layer's
  output ``x @ W.T``, computed on the host with the layer's weights. The largest input is a
  candidate, so the chosen range never has a larger error than the no-clipping range. Layers
  are calibrated in order, each on the inputs that the calibrated layers before it give on
  this chip.
- **ADC ranges.** Each layer's tiles get one ADC full scale (one, because the board sums the
  row blocks' codes and reads the sum with one LSB). The rule: a search on the chip. The
  candidates are the power-on full scale times 2^(k/2), k = -12..4 (those the tiles cannot
  set are left out); for each, the layer runs on its calibration inputs and the mean squared
  error of its outputs against the host's product with the weights the chip holds is
  measured; the least wins. The power-on range is a candidate, so the chosen one never has a
  larger error on the calibration batches. A layer whose tiles also hold another layer's
  blocks keeps the power-on range.

Each step returns its constants (plain numbers, gathered in a :class:`Calibration`), which a
deployment saves and :func:`apply_calibration` applies to a chip again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cim_hil.codes import input_codes, top_code
from cim_hil.errors import UnsafeValueError
from cim_hil.nn import AnalogConv2d, AnalogLayer

ADC_STEPS = tuple(range(-12, 5))  # candidate full scales: the power-on one times 2^(k/2)
INPUT_QUANTILES = (0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 1.0)
INPUT_FRACTIONS = tuple(f / 10 for f in range(1, 10))  # fractions of the largest |input| besides
MAX_QUANTILE_SAMPLES = 1 << 22  # torch.quantile's input limit is 2**24 values; a sample suffices
MAX_ERROR_ROWS = 8192


@dataclass
class Calibration:
    """Calibrated constants of one chip, by layer name; an empty dict is a step switched off."""

    column_gains: dict[str, list[float]] = field(default_factory=dict)  # analog gain per column
    input_ranges: dict[str, float] = field(default_factory=dict)  # DAC full scale, input units
    adc_ranges: dict[str, float] = field(default_factory=dict)  # the layer's tiles' ADC full scale, uA

    def as_dict(self) -> dict:
        return {"column_gains": self.column_gains, "input_ranges": self.input_ranges, "adc_ranges": self.adc_ranges}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        return cls({k: list(v) for k, v in data.get("column_gains", {}).items()},
                   {k: float(v) for k, v in data.get("input_ranges", {}).items()},
                   {k: float(v) for k, v in data.get("adc_ranges", {}).items()})


def named_analog_layers(model: nn.Module) -> list[tuple[str, AnalogLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AnalogLayer)]


# ---- column ranges --------------------------------------------------------------------------
def column_gains(layer: AnalogLayer, weights: torch.Tensor) -> torch.Tensor:
    """Per column (output), the gain that puts its largest |weight| on the outermost level."""
    mapping = layer.mapping
    reach = min(-mapping.low, mapping.high) * mapping.spacing * mapping.scale  # largest |W| on a level
    largest = weights.abs().amax(1)
    return torch.where(largest > 0, reach / largest.clamp_min(1e-30), torch.ones_like(largest))


@torch.no_grad()
def program_columns(layer: AnalogLayer, weights: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Program ``weights`` (out, in) with column ``gains`` by write-verify (only the devices whose
    level changes); the host's weight copy and the output scale follow what was reached. Returns
    the target levels."""
    mapping = layer.mapping
    targets = mapping.levels_for(weights * gains.unsqueeze(1))
    reached = mapping.program_levels(targets, previous=layer.levels)
    layer.levels.copy_(reached)
    mapping.output_scale = 1.0 / gains
    layer.weight.copy_(mapping.weights_for(reached) / gains.unsqueeze(1))
    return targets


# ---- input ranges ---------------------------------------------------------------------------
def layer_inputs(layer: AnalogLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the layer's DAC converts, one row per product, with the matching logical weights
    (out, in): a linear layer's inputs; a convolution's patches (channels first, as
    ``F.unfold`` gives them, against the kernel in the same order)."""
    if isinstance(layer, AnalogConv2d):
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        weights = layer.as_kernel(layer.weight).reshape(layer.out_channels, -1)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]), weights.detach()
    return x.reshape(-1, layer.in_features), layer.weight.detach()


def dac_output_error(inputs: torch.Tensor, weights: torch.Tensor, input_range: float, bits: int) -> float:
    """Mean squared error of ``inputs @ weights.T`` caused by a DAC of ``bits`` (sign included)
    with full scale ``input_range``: clipping beyond it and rounding to its codes."""
    converted = input_codes(inputs / input_range, bits).div_(top_code(bits)).mul_(input_range)
    return float(((converted - inputs) @ weights.T).square().mean())


def candidate_ranges(inputs: torch.Tensor) -> list[float]:
    magnitudes = inputs.abs().flatten()
    largest = float(magnitudes.max())
    if largest == 0.0:
        return [1.0]
    if magnitudes.numel() > MAX_QUANTILE_SAMPLES:
        stride = -(-magnitudes.numel() // MAX_QUANTILE_SAMPLES)
        magnitudes = magnitudes[::stride]
    quantiles = torch.quantile(magnitudes, torch.tensor(INPUT_QUANTILES)).tolist()
    candidates = {largest, *(q for q in quantiles if q > 0), *(largest * f for f in INPUT_FRACTIONS)}
    return sorted(candidates)


def choose_input_range(inputs: torch.Tensor, weights: torch.Tensor, bits: int) -> tuple[float, dict[float, float]]:
    """The candidate range with the least DAC output error, and every candidate's error. The
    candidates come from every input row; the errors are measured on at most
    ``MAX_ERROR_ROWS`` of them, evenly spaced (a convolution has hundreds of patches per image)."""
    candidates = candidate_ranges(inputs)
    if len(inputs) > MAX_ERROR_ROWS:
        inputs = inputs[:: -(-len(inputs) // MAX_ERROR_ROWS)]
    errors = {r: dac_output_error(inputs, weights, r, bits) for r in candidates}
    return min(errors, key=errors.get), errors


@torch.no_grad()
def calibrate_input_ranges(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Set each analog layer's fixed input range in turn from the calibration ``images``."""
    model.eval()
    ranges = {}
    for name, layer in named_analog_layers(model):
        inputs, weights = layer_inputs(layer, _seen_inputs(model, layer, images))
        chosen, _ = choose_input_range(inputs, weights, layer.mapping.spec.input_bits)
        layer.mapping.input_range = chosen
        ranges[name] = chosen
    return ranges


# ---- ADC ranges -----------------------------------------------------------------------------
def _seen_inputs(model: nn.Module, layer: AnalogLayer, images: torch.Tensor) -> torch.Tensor:
    """What ``layer`` is given when ``model`` runs on ``images``."""
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    try:
        model(images)
    finally:
        hook.remove()
    return seen[0]


def host_products(layer: AnalogLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's products, without bias, computed on the host with the weights the chip holds."""
    if isinstance(layer, AnalogConv2d):
        return F.conv2d(x, layer.as_kernel(layer.weight), None, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, layer.weight)


def adc_output_error(layer: AnalogLayer, x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of the layer's outputs on the chip against ``reference``."""
    out = layer(x)
    if layer.bias is not None:
        out = out - layer.bias.view(1, -1, *([1] * (out.ndim - 2)))
    return float((out - reference).square().mean())


def set_layer_adc_range(layer: AnalogLayer, full_scale_ua: float | None) -> None:
    for tile in layer.mapping.tiles:
        tile.set_adc_range(full_scale_ua)


def choose_adc_range(layer: AnalogLayer, x: torch.Tensor) -> tuple[float, dict[float, float]]:
    """The candidate full scale (uA) with the least output error on inputs ``x``, set on the
    layer's tiles, and every candidate's error."""
    power_on = layer.mapping.tiles[0].set_adc_range(None) * top_code(layer.mapping.spec.output_bits)
    reference = host_products(layer, x)
    errors = {}
    for step in ADC_STEPS:
        full_scale = power_on * 2 ** (step / 2)
        try:
            set_layer_adc_range(layer, full_scale)
        except UnsafeValueError:  # beyond what the tiles can set
            continue
        errors[full_scale] = adc_output_error(layer, x, reference)
    chosen = min(errors, key=errors.get)
    set_layer_adc_range(layer, chosen)
    return chosen, errors


@torch.no_grad()
def calibrate_adc_ranges(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Set each analog layer's ADC full scale in turn from the calibration ``images``."""
    model.eval()
    ranges = {}
    for name, layer in named_analog_layers(model):
        if layer.mapping.whole_tiles:
            ranges[name], _ = choose_adc_range(layer, _seen_inputs(model, layer, images))
    return ranges


@torch.no_grad()
def calibrate_columns(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Program every analog layer's columns to the full conductance range from the trained
    ``weights`` (by layer name, in the analog layers' layout); returns the gains."""
    gains = {}
    for name, layer in named_analog_layers(model):
        chosen = column_gains(layer, weights[name])
        program_columns(layer, weights[name], chosen)
        gains[name] = chosen.tolist()
    return gains


@torch.no_grad()
def apply_calibration(model: nn.Module, weights: dict[str, torch.Tensor], calibration: Calibration) -> None:
    """Apply saved constants to a model programmed on a chip: program the column gains, set the
    input ranges and the ADC ranges. Layers a step does not name keep their defaults."""
    for name, layer in named_analog_layers(model):
        if name in calibration.column_gains:
            program_columns(layer, weights[name], torch.tensor(calibration.column_gains[name]))
        if name in calibration.input_ranges:
            layer.mapping.input_range = calibration.input_ranges[name]
        if name in calibration.adc_ranges:
            set_layer_adc_range(layer, calibration.adc_ranges[name])
