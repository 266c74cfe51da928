"""Torch layers whose weights live on CIM tiles.

Forward products run on the tiles. Backward: the input gradient comes from transpose products
on the tiles when the mapping allows it, else from the host's copy of the weights (as on the
reference chip); the weight gradient is always the host's outer product. Biases are ordinary
digital parameters on the host.

``weight`` is the host's copy of what is programmed, a view of the model's
:class:`~cim_hil.nn.store.WeightStore` (as ``levels`` is); the mixed-precision optimizer never
writes it directly, it programs the devices through
:class:`cim_hil.nn.programming.StepProgrammer`, which keeps the store in step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cim_hil.errors import CimHilError
from cim_hil.group import TileGroup
from cim_hil.layer_products import Convolution, unroll
from cim_hil.nn.config import MappingConfig
from cim_hil.nn.mapping import Spot, TileMapping
from cim_hil.nn.store import StoredLayer, WeightStore


def _bias_gradient(ctx, grad_rows: torch.Tensor) -> torch.Tensor | None:
    return grad_rows.sum(0) if ctx.needs_input_grad[2] else None


class _AnalogProduct(torch.autograd.Function):
    """x @ W.T + bias with the products on the tiles; the bias is added on the host."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                mapping: TileMapping) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.mapping = mapping
        return mapping.forward(x, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        mapping: TileMapping = ctx.mapping
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = mapping.backward(grad_out) if mapping.analog_backward else grad_out @ weight
        return grad_x, grad_out.T @ x, _bias_gradient(ctx, grad_out), None


class _AnalogConvolution(torch.autograd.Function):
    """A convolution's products on the tiles, one per patch of the image (im2col), the images
    sent whole (see ``TileMapping.forward_images``). Backward works on the image (see
    ``AnalogConv2d._input_gradient``); the weight gradient is the host's product of the output
    gradient with the patches."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: AnalogConv2d) -> torch.Tensor:
        convolution = layer.geometry(x)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.convolution = layer, convolution
        return layer.mapping.forward_images(x, convolution, bias)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_x = layer._input_gradient(x, weight, grad_rows) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # Column by column where a patch fits one tile (far faster to copy than rows); else
            # rows, copied in runs of kw * C values.
            patches = unroll(x.detach(), ctx.convolution, by_column=layer.mapping.row_blocks == 1)
            grad_weight = _split_inner_product(grad_rows.T, patches)
        return grad_x, grad_weight, _bias_gradient(ctx, grad_rows), None


def _split_inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a long inner dimension (a convolution's weight gradient sums over every patch
    of the batch), cut into one part per CPU thread and run as one batched product: a single
    product with a few rows runs on one thread."""
    parts, inner = torch.get_num_threads(), a.shape[1]
    if parts < 2 or inner % parts:
        return a @ b
    return torch.bmm(a.reshape(len(a), parts, -1).transpose(0, 1), b.reshape(parts, -1, b.shape[1])).sum(0)


class AnalogLayer(nn.Module):
    """Shared state of analog layers: the mapping and the host's view of the devices.

    ``weight`` and ``levels`` are views of the layer's part of a weight store (its model's, or
    its own when made alone), written in place and never replaced.
    """

    STORED = ("weight", "levels")

    def _setup(self, in_features: int, out_features: int, initial: torch.Tensor, bias: torch.Tensor | None,
               group: TileGroup, config: MappingConfig, spots: list[Spot] | None, whole_tiles: bool,
               stored: StoredLayer | None) -> None:
        if stored is None:
            stored = WeightStore(group, [(out_features, in_features)], config.programming == "write_verify").part(0)
        self.mapping = mapping = TileMapping(in_features, out_features, group, config, initial, spots, whole_tiles)
        stored.store.fill(stored.index, mapping)
        levels, weights = stored.levels, stored.weights
        if levels is not None:
            levels.copy_(mapping.program_levels(mapping.levels_for(initial), previous=None))
            weights.copy_(mapping.weights_for(levels))
        else:
            weights.copy_(mapping.program_weights_open_loop(initial))
        self.register_buffer("levels", levels)
        self.weight = nn.Parameter(weights)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.stored = stored  # from here on, ``weight`` and ``levels`` stay what they are

    def __setattr__(self, name: str, value) -> None:
        if name in self.STORED and "stored" in self.__dict__:
            raise CimHilError(f"an analog layer's {name} is a view of its weight store and is never replaced; "
                              f"write into it in place (layer.{name}.copy_(...))")
        super().__setattr__(name, value)

    @property
    def granularity(self) -> float:
        """The smallest weight change one programming step makes (epsilon)."""
        return self.mapping.granularity

    @torch.no_grad()
    def rewrite_devices(self) -> None:
        """Program the devices from the host's copy again: after a resume on real hardware,
        whose devices may have moved since the checkpoint."""
        if self.levels is None:
            self.weight.copy_(self.mapping.program_weights_open_loop(self.weight))
        else:
            self.mapping.program_levels(self.levels, previous=None)


class AnalogLinear(AnalogLayer):
    """A ``Linear`` whose products run on a ``group`` of tiles. ``spots``, ``whole_tiles``:
    where the blocks sit on the group's tiles (see ``TileMapping``); ``stored``: its part of
    its model's weight store (see ``convert_to_analog``), else it keeps a store of its own."""

    def __init__(self, linear: nn.Linear, group: TileGroup, config: MappingConfig, spots: list[Spot] | None = None,
                 whole_tiles: bool = True, stored: StoredLayer | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear.in_features, linear.out_features, linear.weight.detach(), linear.bias, group, config,
                    spots, whole_tiles, stored)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _AnalogProduct.apply(x.reshape(-1, self.in_features), self.weight, self.bias, self.mapping)
        return y.reshape(*shape[:-1], self.out_features)


class AnalogConv2d(AnalogLayer):
    """A convolution as one matrix product over the input's patches (im2col).

    ``weight`` is (out_channels, kh * kw * C): each output channel's kernel flattened channels
    last, the order in which a patch's values lie in a channels-last image (what this layer
    returns, and what ReLU and pooling keep), so patches copy in runs of kw * C values.
    ``as_kernel`` gives it as a ``Conv2d`` holds it.
    """

    def __init__(self, conv: nn.Conv2d, group: TileGroup, config: MappingConfig, spots: list[Spot] | None = None,
                 whole_tiles: bool = True, stored: StoredLayer | None = None) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError("analog convolution supports groups=1, numeric zero padding")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.in_channels = conv.in_channels
        weight = conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
        self._setup(weight.shape[1], conv.out_channels, weight, conv.bias, group, config, spots, whole_tiles, stored)

    def as_kernel(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` shaped like ``weight`` (the weights, their gradient, chi) as a ``Conv2d``
        kernel is shaped, (out_channels, C, kh, kw): a view, no copy."""
        return values.view(self.out_channels, *self.kernel_size, self.in_channels).permute(0, 3, 1, 2)

    def geometry(self, x: torch.Tensor) -> Convolution:
        """This convolution's geometry on images shaped like ``x`` (N, C, H, W)."""
        return Convolution(self.in_channels, x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding,
                           self.dilation)

    def _input_gradient(self, x: torch.Tensor, weight: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
        """The gradient of the image from the output gradient (one row per patch): transpose
        products on the tiles summed back over the windows (fold), or on the host from its copy
        of the weights as a transposed convolution. Either costs a fraction of going back
        through the strided view the patch matrix was copied from."""
        n, channels, height, width = x.shape
        if self.mapping.analog_backward:
            per_patch = self.mapping.backward(grad_rows).view(n, -1, *self.kernel_size, channels)
            columns = per_patch.permute(0, 4, 2, 3, 1).reshape(n, weight.shape[1], -1)  # fold's order: C, kh, kw
            return F.fold(columns, (height, width), self.kernel_size, dilation=self.dilation, padding=self.padding,
                          stride=self.stride)
        grad_out = grad_rows.view(n, *self.geometry(x).out_size, self.out_channels).permute(0, 3, 1, 2)
        # Given the image itself (``conv2d_input`` takes only its shape), the gradient comes in
        # the image's memory format. An earlier analog convolution's output, pooled, is channels
        # last, and pooling's backward takes a channels-first gradient for it several times slower.
        return torch.ops.aten.convolution_backward(
            grad_out, x, self.as_kernel(weight), None, self.stride, self.padding, self.dilation, False, [0, 0], 1,
            [True, False, False],
        )[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _AnalogConvolution.apply(x, self.weight, self.bias, self)  # (N * out_h * out_w, O)
        return y.reshape(x.shape[0], *self.geometry(x).out_size, self.out_channels).permute(0, 3, 1, 2)
