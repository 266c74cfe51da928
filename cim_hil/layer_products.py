"""A whole layer's forward products on its tiles, from DAC codes, in one call.

A layer's weight matrix is cut over a grid of tiles (:class:`LayerCut`); a product sends each
block of the inputs to its tiles and sums the partial products of the row blocks. A
convolution (:class:`Convolution`) is one such product over every patch of its images.

:func:`layer_products` takes the inputs as DAC codes, and a convolution's as whole images:
a backend that can cut the patches itself (the firmware protocol's LAYER_FORWARD) is sent each
image once instead of every patch, and one set of summed outputs per layer comes back. The
plain version here, which any group of tiles gets, cuts the patches on the host with
:func:`unroll` and runs the group's products; the emulator and the reference firmware use the
same :func:`unroll`, so host-cut and board-cut patches give the same numbers.

A layer whose blocks are packed beside other layers' blocks names each block's ``origins``
(row, col) on its tile: each block then runs on its window (``TileGroup.forward(windows=)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cim_hil.codes import top_code
from cim_hil.errors import ShapeError, UnsafeValueError
from cim_hil.tile import Capability

if TYPE_CHECKING:
    from cim_hil.group import TileGroup

# A layer call runs in parts of at most this many codes each way, so that on a board each
# part's request and reply fit one message (firmware_protocol/SPEC.md §2: 1 MiB, and three
# bytes a code at worst). Every backend cuts the same parts, so their numbers agree.
CODES_PER_CALL = 1 << 18


@dataclass(frozen=True)
class LayerCut:
    """A (out_features, in_features) matrix over a grid of row_blocks x col_blocks tiles: tile
    r * col_blocks + c holds inputs r * rows.. and outputs c * cols.., transposed."""

    in_features: int
    out_features: int
    row_blocks: int
    col_blocks: int

    @classmethod
    def of(cls, in_features: int, out_features: int, rows: int, cols: int) -> "LayerCut":
        return cls(in_features, out_features, -(-in_features // rows), -(-out_features // cols))

    @property
    def tiles(self) -> int:
        return self.row_blocks * self.col_blocks

    def outputs(self, cols: int) -> list[int]:
        """How many outputs each tile converts, in tile order."""
        widths = [min(cols, self.out_features - block * cols) for block in range(self.col_blocks)]
        return widths * self.row_blocks

    def windows(self, origins: list[tuple[int, int]], rows: int, cols: int) -> list[tuple[int, int, int, int]]:
        """Each block's window (row_start, row_stop, col_start, col_stop) at its origin, in tile
        order; a block that would pass its tile's edge is refused."""
        if len(origins) != self.tiles:
            raise ShapeError(f"{self.tiles} blocks need one origin each, got {len(origins)}")
        heights = [min(rows, self.in_features - block * rows) for block in range(self.row_blocks)]
        widths = self.outputs(cols)
        windows = []
        for index, ((row, col), width) in enumerate(zip(origins, widths)):
            height = heights[index // self.col_blocks]
            if not (0 <= row and row + height <= rows and 0 <= col and col + width <= cols):
                raise ShapeError(f"block {index} ({height}x{width}) at origin ({row}, {col}) passes the edge of "
                                 f"the {rows}x{cols} tile")
            windows.append((row, row + height, col, col + width))
        return windows


@dataclass(frozen=True)
class Convolution:
    """A convolution's geometry: images (channels, height, width); kernel, stride, padding
    (zeros) and dilation as (height, width). A patch's codes lie in the order (kernel row,
    kernel column, channel): channels last, as ``AnalogConv2d`` flattens its kernels."""

    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                (self.height, self.width), self.padding, self.dilation, self.kernel, self.stride)
        )

    @property
    def patch_size(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.channels

    def check(self) -> None:
        if min(self.channels, self.height, self.width, *self.kernel, *self.stride, *self.dilation) < 1 or min(
                self.padding) < 0:
            raise ShapeError(f"convolution geometry {self} has a size, kernel, stride or dilation below 1 or a "
                             "negative padding")
        if min(self.out_size) < 1:
            raise ShapeError(f"a {self.kernel} kernel (dilation {self.dilation}) does not fit a "
                             f"{self.height}x{self.width} image padded by {self.padding}")


def _windows(x: torch.Tensor, dim: int, size: int, stride: int, dilation: int) -> torch.Tensor:
    """Every window along ``dim`` as a new last dimension: a strided view, no copy."""
    windows = x.unfold(dim, (size - 1) * dilation + 1, stride)
    return windows[..., ::dilation] if dilation > 1 else windows


def unroll(images: torch.Tensor, convolution: Convolution, by_column: bool = False) -> torch.Tensor:
    """Every patch of ``images`` (N, C, H, W) as a row: (N * out_h * out_w, kh * kw * C), patch
    (n, y, x) at row (n * out_h + y) * out_w + x, zeros where a patch reaches into the padding.

    ``by_column`` stores the matrix column by column (each column is then a shifted window of
    every image, copied in runs of out_w values: the faster copy when the patch is one tile's
    input); else row by row from a channels-last image, runs of kw * C values. The values are
    the same either way.
    """
    (kh, kw), (sh, sw), (dh, dw) = convolution.kernel, convolution.stride, convolution.dilation
    ph, pw = convolution.padding
    x = F.pad(images, (pw, pw, ph, ph)) if ph or pw else images
    if by_column:
        windows = _windows(_windows(x, 2, kh, sh, dh), 3, kw, sw, dw)  # (N, C, out_h, out_w, kh, kw)
        columns = windows.permute(4, 5, 1, 0, 2, 3)
        return columns.reshape(columns.shape[:3].numel(), -1).T
    image = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # (N, H, W, C)
    windows = _windows(_windows(image, 1, kh, sh, dh), 2, kw, sw, dw)  # (N, out_h, out_w, C, kh, kw)
    rows = windows.permute(0, 1, 2, 4, 5, 3)
    return rows.reshape(rows.shape[:3].numel(), -1)


def block_inputs(inputs: torch.Tensor, cut: LayerCut, rows: int) -> torch.Tensor:
    """Each tile's block of ``inputs`` (n, in_features): (tiles, n, driven), zeros beyond the
    inputs in the last row block; tile (r, c) takes block r."""
    n, width = inputs.shape
    driven = min(rows, width)
    if cut.row_blocks * driven > width:
        padded = inputs.new_zeros(n, cut.row_blocks * driven)
        padded[:, :width] = inputs
        inputs = padded
    blocks = inputs.view(n, cut.row_blocks, driven).transpose(0, 1)  # (row_blocks, n, driven)
    if cut.col_blocks > 1:
        blocks = blocks.unsqueeze(1).expand(cut.row_blocks, cut.col_blocks, n, driven).reshape(-1, n, driven)
    return blocks


def sum_row_blocks(outputs: torch.Tensor, cut: LayerCut) -> torch.Tensor:
    """(tiles, n, widest) outputs of a layer's tiles -> (n, out_features): the row blocks'
    partial products summed, the column blocks side by side."""
    n = outputs.shape[1]
    grid = outputs.view(cut.row_blocks, cut.col_blocks, n, -1).permute(2, 1, 0, 3)  # (n, col, row, widest)
    summed = grid.sum(2) if cut.row_blocks > 1 else grid[:, :, 0]
    return summed.reshape(n, -1)[:, : cut.out_features]


def layer_products(
    group: TileGroup, cut: LayerCut, codes: torch.Tensor, convolution: Convolution | None = None,
    origins: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Output currents (uA) of a layer's forward products, (n, out_features), its row blocks
    summed: one row per sample of ``codes`` (n, in_features), or with ``convolution`` one per
    patch of the images ``codes`` (N, C, H, W), image after image, each row-major over the
    output positions.

    ``codes`` are the DAC's signed input codes (whole numbers within +-(2^(input_bits-1) - 1)).
    ``origins``: each block's corner (row, col) on its tile, for blocks packed into windows.
    A batch larger than CODES_PER_CALL allows runs as several calls of whole samples.
    """
    group._require(Capability.ANALOG_PRODUCTS)
    spec = group.spec
    if len(group) != cut.tiles or cut != LayerCut.of(cut.in_features, cut.out_features, spec.rows, spec.cols):
        raise ShapeError(f"a {cut.out_features}x{cut.in_features} layer on {spec.rows}x{spec.cols} tiles is not cut "
                         f"into {cut.row_blocks}x{cut.col_blocks} blocks on {len(group)} tiles")
    codes = torch.as_tensor(codes)
    if convolution is None:
        if codes.ndim != 2 or codes.shape[1] != cut.in_features:
            raise ShapeError(f"layer inputs must have shape (batch, {cut.in_features}), got {tuple(codes.shape)}")
    else:
        convolution.check()
        expected = (convolution.channels, convolution.height, convolution.width)
        if codes.ndim != 4 or tuple(codes.shape[1:]) != expected or convolution.patch_size != cut.in_features:
            raise ShapeError(f"convolution inputs must have shape (batch, {', '.join(map(str, expected))}) and "
                             f"patches of {cut.in_features} codes, got {tuple(codes.shape)}")
    if origins is not None:
        origins = [(int(row), int(col)) for row, col in origins]
        cut.windows(origins, spec.rows, spec.cols)
    top = top_code(spec.input_bits)
    if codes.numel():
        lowest, highest = torch.aminmax(codes)
        if not (bool(lowest >= -top) and bool(highest <= top)):  # false for NaN too
            raise UnsafeValueError(f"input codes must be whole numbers within +-{top}; nothing was run")
    # A backend that runs a whole layer itself has a group class whose ``_layer_products`` does.
    run = group._layer_products
    codes = codes.to(torch.float32)
    per_sample = max(codes[0].numel() if len(codes) else 1,
                     cut.out_features * (math.prod(convolution.out_size) if convolution is not None else 1))
    part = max(1, CODES_PER_CALL // per_sample)
    if len(codes) <= part:
        return run(cut, codes, convolution, origins)
    return torch.cat([run(cut, codes[start : start + part], convolution, origins)
                      for start in range(0, len(codes), part)])


def products_of_blocks(
    group: TileGroup, cut: LayerCut, codes: torch.Tensor, convolution: Convolution | None,
    origins: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """The plain version: patches cut on the host, the group's products (inputs in range by
    construction; each block on its window where ``origins`` are given), the row blocks'
    currents summed on the host."""
    spec = group.spec
    inputs = unroll(codes, convolution, by_column=cut.row_blocks == 1) if convolution is not None else codes
    fractions = block_inputs(inputs, cut, spec.rows) / top_code(spec.input_bits)
    outputs = cut.outputs(spec.cols)
    if origins is None:
        currents = group._products(fractions, outputs, False, in_range=True)
    else:
        currents = group._products_on(fractions, outputs, False, True, cut.windows(origins, spec.rows, spec.cols))
    return sum_row_blocks(currents, cut)
