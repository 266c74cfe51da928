"""Torch layers whose weights live on CIM tiles.

Forward products run on the tiles. Backward: the input gradient comes from transpose products
on the tiles when the mapping allows it, else from the host's copy of the weights (as on the
reference chip); the weight gradient is always the host's outer product. Biases are ordinary
digital parameters on the host.

``weight`` is the host's copy of what is programmed; the mixed-precision optimizer never
writes it directly, it calls :meth:`AnalogLayer.program_steps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cim_hil.nn.config import MappingConfig
from cim_hil.nn.mapping import TileMapping
from cim_hil.tile import Tile


class _AnalogProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mapping: TileMapping) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.mapping = mapping
        return mapping.forward(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        mapping: TileMapping = ctx.mapping
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = mapping.backward(grad_out) if mapping.analog_backward else grad_out @ weight
        return grad_x, grad_out.T @ x, None


class AnalogLayer(nn.Module):
    """Shared state of analog layers: the mapping and the host's view of the devices."""

    def _setup(self, in_features: int, out_features: int, initial: torch.Tensor, bias: torch.Tensor | None,
               tiles: list[Tile], config: MappingConfig) -> None:
        self.mapping = TileMapping(in_features, out_features, tiles, config, initial)
        if config.programming == "write_verify":
            levels = self.mapping.program_levels(self.mapping.levels_for(initial), previous=None)
            self.register_buffer("levels", levels)
            self.weight = nn.Parameter(self.mapping.weights_for(levels))
        else:
            self.register_buffer("levels", None)
            self.weight = nn.Parameter(self.mapping.program_weights_open_loop(initial))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def granularity(self) -> float:
        """The smallest weight change one programming step makes (epsilon)."""
        return self.mapping.granularity

    @torch.no_grad()
    def program_steps(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Program ``steps`` (signed, per weight) granularity steps.

        Returns the weight change the devices actually took, so the caller can account for
        exactly that, and which devices were programmed (a device already at the bound it is
        pushed towards is not).
        """
        if self.levels is None:
            pulses = self.mapping.program_pulses(steps)
            applied = pulses * self.granularity
            self.weight.add_(applied)
            return applied, pulses != 0
        step = self.mapping.config.granularity_levels
        wanted = (self.levels + steps * step).clamp(self.mapping.low, self.mapping.high)
        reached = self.mapping.program_levels(wanted, previous=self.levels)
        applied = self.mapping.weights_for(reached - self.levels)
        programmed = wanted != self.levels
        self.levels.copy_(reached)
        self.weight.copy_(self.mapping.weights_for(reached))
        return applied, programmed

    @torch.no_grad()
    def rewrite_devices(self) -> None:
        """Program the devices from the host's copy again: after a resume on real hardware,
        whose devices may have moved since the checkpoint."""
        if self.levels is None:
            self.weight.copy_(self.mapping.program_weights_open_loop(self.weight))
        else:
            self.mapping.program_levels(self.levels, previous=None)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return _AnalogProduct.apply(x, self.weight, self.mapping)


class AnalogLinear(AnalogLayer):
    def __init__(self, linear: nn.Linear, tiles: list[Tile], config: MappingConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear.in_features, linear.out_features, linear.weight.detach(), linear.bias, tiles, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._product(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class AnalogConv2d(AnalogLayer):
    """A convolution as one matrix product over unfolded input patches (im2col)."""

    def __init__(self, conv: nn.Conv2d, tiles: list[Tile], config: MappingConfig) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError("analog convolution supports groups=1, numeric zero padding")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        weight = conv.weight.detach().reshape(conv.out_channels, -1)
        self._setup(weight.shape[1], conv.out_channels, weight, conv.bias, tiles, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out_h = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        y = self._product(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(n, out_h * out_w, self.out_channels).transpose(1, 2).reshape(n, self.out_channels, out_h, out_w)
