"""A logical weight matrix spread over fixed-size tiles, and its weight <-> conductance map.

The logical matrix W has shape (out_features, in_features); a tile holds a block of W
transposed (rows = inputs, cols = outputs), and partial products of the blocks along the
input dimension are summed on the host. Weights are W = (G - G_ref) * scale.

The host keeps what it believes is programmed: the level index of every device (write-verify)
or the nominal weight (pulses). Programming reports exactly what each device took, so the
trainer can account for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cim_hil.codes import input_codes
from cim_hil.errors import CapabilityError, ConfigError
from cim_hil.layer_products import Convolution, LayerCut, layer_products
from cim_hil.group import TileGroup
from cim_hil.nn.config import MappingConfig
from cim_hil.tile import Capability, Tile, averaged_read, require_finite


class LevelWrite:
    """Write-verify of weights to new levels as one ``program_places`` call of ``group``,
    which may hold several layers' blocks: a training step pays for one call, not one per
    layer. ``mapping`` gives the level conventions, which the layers must share (one tile spec
    and mapping config).

    ``places`` (k,) are the weights' places in ``group`` (flat device indices in the stack of
    its tiles); ``levels`` their new relative levels; ``previous`` their present ones (None:
    program every device afresh). Only devices whose level changes are programmed.
    """

    def __init__(
        self, mapping: TileMapping, group: TileGroup, places: torch.Tensor, levels: torch.Tensor,
        previous: torch.Tensor | None,
    ) -> None:
        self.mapping, self.group = mapping, group
        self.device_levels = mapping._device_levels(levels)  # (2, k): weight devices, reference devices
        if previous is None:
            self.write = torch.ones_like(self.device_levels, dtype=torch.bool)
            self.write[1] = mapping.spec.supports(Capability.REFERENCE)
        else:
            self.write = self.device_levels != mapping._device_levels(previous)
        # Row-major order: every weight device to write, then every reference device.
        reference, weight = self.write.nonzero(as_tuple=True)
        self.places = places.index_select(0, weight)
        self.reference = reference.bool()
        self.targets_us = mapping._conductance(self.device_levels.masked_select(self.write))  # (not a bool index: slower)

    def run(self) -> torch.Tensor:
        """Program the devices; returns the relative levels the weights reached, read back."""
        if not len(self.places):
            return self._levels_reached(torch.empty(0))
        result = self.group.program_places(self.places, self.targets_us, self.reference)
        return self._levels_reached(result.reached_us.cpu())

    def _levels_reached(self, reached_us: torch.Tensor) -> torch.Tensor:
        reached = self.device_levels.masked_scatter(self.write, self.mapping._level_of(reached_us))
        if not self.mapping.config.differential:
            return reached[0] - self.mapping.ref_level
        return reached[0] - reached[1]


Spot = tuple[int, int, int]
"""Where a block sits: (index into the layer's tiles, row, column of its first device)."""


class TileMapping:
    """One logical (out_features, in_features) weight matrix on a ``group`` of tiles: where each
    weight sits, the weight <-> level <-> conductance conventions (W = (G - G_ref) * scale),
    and the layer's products and programming through the group.

    ``group`` holds the distinct tiles the layer uses; ``spots`` give, for each block in
    row-major grid order, its tile and corner (default: block i alone on tile i). A block at a
    corner other than (0, 0) runs its products on its window of the tile; ``whole_tiles``
    says the layer's tiles hold no other layer's blocks, so their unused devices are its own.
    ``initial`` (the weights to start from) sets ``scale``: its largest magnitude takes
    ``config.weight_fill`` of the conductance range either side of the reference.
    """

    def __init__(
        self, in_features: int, out_features: int, group: TileGroup, config: MappingConfig, initial: torch.Tensor,
        spots: list[Spot] | None = None, whole_tiles: bool = True,
    ) -> None:
        spec = group.spec
        self.spec, self.config = spec, config
        self.in_features, self.out_features = in_features, out_features
        self.cut = LayerCut.of(in_features, out_features, spec.rows, spec.cols)
        self.row_blocks, self.col_blocks = self.cut.row_blocks, self.cut.col_blocks
        self.spots = spots or [(index, 0, 0) for index in range(len(group))]
        if len(self.spots) != self.row_blocks * self.col_blocks:
            raise ConfigError(f"a {out_features}x{in_features} matrix takes {self.row_blocks * self.col_blocks} "
                              f"blocks of {spec.rows}x{spec.cols}, {len(self.spots)} were placed")
        self.group, self.tiles, self.whole_tiles = group, group.tiles, whole_tiles
        block_tiles = [group.tiles[tile] for tile, _, _ in self.spots]  # one per block, in grid order
        same = len(block_tiles) == len(group) and all(a is b for a, b in zip(block_tiles, group.tiles))
        self._block_group = group if same else type(group)(block_tiles, group.board)  # products only
        packed = any(row or col for _, row, col in self.spots)
        self._origins = [(row, col) for _, row, col in self.spots] if packed else None
        self._windows = self._block_windows() if packed else None
        self._check_capabilities()
        top = spec.levels - 1
        self.spacing = spec.level_spacing_us
        if config.differential:
            self.ref_level, self.low, self.high = 0, -top, top
        else:
            self.ref_level = top // 2
            self.low, self.high = -self.ref_level, top - self.ref_level
        reach = min(-self.low, self.high) * self.spacing  # uS either side of the reference
        largest = float(initial.abs().max()) or 1.0
        self.scale = largest / (config.weight_fill * reach)  # weight per uS
        if config.programming == "write_verify":
            self.granularity = config.granularity_levels * self.spacing * self.scale
        else:
            self.granularity = (config.pulse_step_us or self.spacing) * self.scale
        self.device_index = self._device_index()
        self._transposed = self._transposed_cut()
        # Post-training calibration (cim_hil.deploy) may set these; None keeps the defaults.
        self.input_range: float | None = None  # a fixed DAC full scale instead of each sample's peak
        self.output_scale: torch.Tensor | None = None  # (out_features,) digital gain per column

    def _check_capabilities(self) -> None:
        spec, config = self.spec, self.config
        needed = {Capability.ANALOG_PRODUCTS, Capability.WRITE_VERIFY}
        if config.programming == "pulses":
            needed.add(Capability.PULSES)
            if config.differential:
                raise ConfigError("mapping.differential needs programming = 'write_verify'")
        elif config.reference == "calibrated":
            raise ConfigError("mapping.reference = 'calibrated' needs programming = 'pulses'")
        if config.differential or config.reference == "calibrated":
            needed.add(Capability.REFERENCE)
        if config.backward == "analog":
            needed.add(Capability.TRANSPOSE)
        missing = sorted(str(c) for c in needed if not spec.supports(c))
        if missing:
            hint = "; set mapping.differential = false" if config.differential and Capability.REFERENCE in missing else ""
            raise CapabilityError(f"the board's tiles lack {', '.join(missing)} needed by this mapping{hint}")

    @property
    def analog_backward(self) -> bool:
        if self.config.backward == "auto":
            return self.spec.supports(Capability.TRANSPOSE)
        return self.config.backward == "analog"

    # ---- the grid of tiles ----------------------------------------------------------------
    # Tile r * col_blocks + c holds the block of inputs r*rows.. and outputs c*cols.., transposed.
    def _device_index(self) -> torch.Tensor:
        """Where each logical weight (out, in) sits: its flat index in the stack (tiles, rows, cols)."""
        rows, cols = self.spec.rows, self.spec.cols
        inputs, outputs = torch.arange(self.in_features), torch.arange(self.out_features).unsqueeze(1)
        block = inputs.div(rows, rounding_mode="floor") * self.col_blocks + outputs.div(cols, rounding_mode="floor")
        tile, row, col = (torch.tensor(values)[block] for values in zip(*self.spots))
        return (tile * rows + row + inputs % rows) * cols + col + outputs % cols

    def _block_windows(self) -> list[tuple[int, int, int, int]]:
        """Each block's window (row_start, row_stop, col_start, col_stop) on its tile, in grid order."""
        heights = self._block_widths(self.in_features, self.spec.rows, self.row_blocks)
        widths = self._block_widths(self.out_features, self.spec.cols, self.col_blocks)
        return [(row, row + heights[index // self.col_blocks], col, col + widths[index % self.col_blocks])
                for index, (_, row, col) in enumerate(self.spots)]

    def _to_tiles(self, logical: torch.Tensor, fill) -> torch.Tensor:
        """A logical (out, in) matrix as the stack (tiles, rows, cols) the tiles hold, padded with ``fill``."""
        rows, cols = self.spec.rows, self.spec.cols
        stacked = torch.full((len(self.tiles) * rows * cols,), fill, dtype=logical.dtype)
        stacked[self.device_index.view(-1)] = logical.reshape(-1)
        return stacked.view(-1, rows, cols)

    def from_tiles(self, stacked: torch.Tensor) -> torch.Tensor:
        """The logical (out, in) matrix back from a stack (tiles, rows, cols) laid out as this
        mapping's tiles: what its own tiles hold, or tiles beside them at the same places (a
        Tiki-Taka fast array)."""
        return stacked.cpu().reshape(-1)[self.device_index]

    def _block_widths(self, size: int, block: int, count: int) -> list[int]:
        return [min(block, size - index * block) for index in range(count)]

    def _transposed_cut(self) -> _TransposedCut:
        """Inputs split by column block, outputs by row block; the partial products summed over columns."""
        kept = self.row_blocks
        outputs = [w for w in self._block_widths(self.in_features, self.spec.rows, kept) for _ in range(self.col_blocks)]
        return _TransposedCut(self.col_blocks, self.spec.cols, 1, kept, outputs, self.in_features)

    # ---- weights <-> levels ---------------------------------------------------------------
    def levels_for(self, weights: torch.Tensor) -> torch.Tensor:
        """Nearest weight level (relative to the reference) of each weight, within range."""
        step = self.spacing * self.scale
        return torch.round(weights / step).clamp(self.low, self.high).to(torch.int64)

    def weights_for(self, levels: torch.Tensor) -> torch.Tensor:
        return levels * (self.spacing * self.scale)

    def _device_levels(self, levels: torch.Tensor) -> torch.Tensor:
        """Absolute device levels for relative weight levels (k,), stacked (2, k): the weight
        (plus) devices', then the reference devices'."""
        if self.config.differential:
            return torch.stack([levels, -levels]).clamp_(min=0)
        return torch.stack([levels + self.ref_level, torch.full_like(levels, self.ref_level)])

    def _conductance(self, device_levels: torch.Tensor) -> torch.Tensor:
        return self.spec.level_conductance(device_levels)

    def _level_of(self, conductance: torch.Tensor) -> torch.Tensor:
        top = self.spec.levels - 1
        return conductance.sub(self.spec.g_min_us).div_(self.spacing).round_().clamp_(0, top).to(torch.int64)

    # ---- programming ----------------------------------------------------------------------
    def program_levels(self, levels: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Write-verify the devices whose level changes from ``previous`` (all if None).

        Returns the relative levels the devices actually reached, read back after verify.
        """
        write = LevelWrite(self, self.group, self.device_index.view(-1), levels.reshape(-1),
                           previous.reshape(-1) if previous is not None else None)
        return write.run().view_as(levels)

    def program_pulses(self, counts: torch.Tensor, tiles: list[Tile] | None = None) -> torch.Tensor:
        """Apply signed pulse counts (out, in); returns the counts the tiles applied. ``tiles``:
        other tiles laid out as this mapping's (a Tiki-Taka fast array beside them), else its own."""
        stacked = self._to_tiles(counts, 0)
        applied = torch.zeros_like(stacked)
        for index, tile in enumerate(self.tiles if tiles is None else tiles):
            if stacked[index].any():
                applied[index] = tile.apply_pulses(stacked[index]).cpu()
        return self.from_tiles(applied)

    def program_weights_open_loop(self, weights: torch.Tensor, reference_reads: int = 8) -> torch.Tensor:
        """Pulse mode start: write-verify each device to its reference + W / scale; returns the
        nominal W. References go to mid-range first, unless they are kept as calibrated."""
        middle = float(self._conductance(torch.tensor(self.ref_level)))
        if self.config.reference == "calibrated":
            measured = torch.stack([averaged_read(tile.read_reference, reference_reads) for tile in self.tiles])
            reference = self.from_tiles(measured)
        else:
            reference = torch.full_like(weights, middle)
            if self.spec.supports(Capability.REFERENCE):
                everywhere = torch.full((len(self.tiles), self.spec.rows, self.spec.cols), middle)
                mine = None if self.whole_tiles else self._to_tiles(torch.ones_like(weights, dtype=torch.bool), False)
                self.group.program_reference(everywhere, mine)
        targets = (reference + weights / self.scale).clamp(self.spec.g_min_us, self.spec.g_max_us)
        used = self._to_tiles(torch.ones_like(targets, dtype=torch.bool), False)
        self.group.program_verify(self._to_tiles(targets, self.spec.g_min_us), used)
        return (targets - reference) * self.scale

    # ---- products -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, in_features) -> x @ W.T + bias (N, out_features), the products run on the tiles
        as one layer call (blocks packed beside other layers' run on their windows);
        the digital ``bias`` (out_features,) is added on the host in the same pass as the scaling."""
        codes, peak = self._input_codes(x.detach())
        currents = layer_products(self._block_group, self.cut, codes, origins=self._origins)
        return self._scaled(currents, peak, bias).to(x.device, x.dtype)

    def forward_images(self, x: torch.Tensor, convolution: Convolution, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A convolution of images x (N, C, H, W): (N * out_h * out_w, out_features), one row
        per patch, image after image. Each image is scaled to the DAC's range as a whole and
        sent as codes; the board (or, for a board that cannot, the host) cuts the patches."""
        codes, peak = self._input_codes(x.detach())
        peaks = peak.repeat_interleave(convolution.out_size[0] * convolution.out_size[1], 0)
        currents = layer_products(self._block_group, self.cut, codes, convolution, self._origins)
        return self._scaled(currents, peaks, bias).to(x.device, x.dtype)

    def _input_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample of ``x`` scaled to the DAC's full range, as the host driver of the chip
        does, as codes; and each sample's peak (N, 1), which scales its outputs back. With a
        calibrated ``input_range``, every sample is scaled by it and the DAC saturates beyond."""
        peak = x.abs().reshape(len(x), -1).amax(dim=1, keepdim=True).clamp_min(1e-12)
        # A NaN or infinity anywhere in a sample shows in its peak (amax propagates NaN).
        require_finite(peak, "the layer's inputs contain")
        if self.input_range is not None:
            return input_codes(x.cpu() / self.input_range, self.spec.input_bits), torch.full_like(peak, self.input_range)
        scale = peak.view(-1, *([1] * (x.ndim - 1)))
        return input_codes(x.cpu() / scale.cpu(), self.spec.input_bits, clamp=False), peak

    def _scaled(self, currents: torch.Tensor, peak: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Output currents (uA) back in weight units, times each row's input peak (and each
        column's ``output_scale``), plus bias."""
        back = self.scale / self.spec.v_read  # uA per unit of normalised input -> weight units
        peak = peak.to(currents.device)
        if self.output_scale is not None:
            peak = peak * self.output_scale.to(currents.device)  # (n, out_features)
        if bias is None:
            return currents * (peak * back)
        return torch.addcmul(bias.to(currents.device), currents, peak, value=back)

    def backward(self, d: torch.Tensor) -> torch.Tensor:
        """d (N, out_features) -> d @ W (N, in_features) with transpose products on the tiles,
        all at once: each gets its block of d, and the partial products of the column blocks
        are added on the host."""
        d = d.detach()
        if self.output_scale is not None:  # d @ W = (d * scale) @ (W / scale)
            d = d * self.output_scale.to(d.device)
        # Scale each sample to the DAC's full range, as the host driver of the chip does.
        peak = d.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        # A NaN or infinity anywhere in a sample shows in its peak (amax propagates NaN).
        require_finite(peak, "the layer's inputs contain")
        n, width = d.shape
        way = self._transposed
        driven = min(way.block, width)  # the widest input block
        if way.blocks * driven > width:  # the last block is driven in part: its other inputs get zeros
            normalised = d.new_zeros(n, way.blocks * driven)
            torch.div(d, peak, out=normalised[:, :width])
        else:
            normalised = d / peak
        inputs = normalised.cpu().view(n, way.blocks, driven).transpose(0, 1)  # (blocks, n, driven)
        if way.kept > 1:  # tile (r, c) takes block c
            inputs = inputs.unsqueeze(0).expand(self.row_blocks, self.col_blocks, n, driven).reshape(-1, n, driven)
        currents = self._products_in_range(inputs, way.outputs, True)
        # (n, kept, summed, width): summing the blocks writes the kept ones side by side, no copy.
        grid = currents.view(self.row_blocks, self.col_blocks, n, -1).permute(2, 1 - way.summed, way.summed, 3)
        out = (grid.sum(2) if way.blocks > 1 else grid[:, :, 0]).reshape(n, -1)[:, : way.features]
        back = self.scale / self.spec.v_read  # uA per unit of normalised input -> weight units
        return (out * (peak.to(out.device) * back)).to(d.device, d.dtype)

    def _products_in_range(self, inputs: torch.Tensor, outputs: list[int], transpose: bool) -> torch.Tensor:
        """The group's products of ``inputs`` this mapping has built itself: (tiles, n, k) by
        construction, each sample scaled into [-1, 1] and its peak checked finite (on a tensor
        far smaller than the inputs), so neither is checked nor clamped again."""
        return self._block_group._products_on(inputs, outputs, transpose, True, self._windows).cpu()


@dataclass(frozen=True)
class _TransposedCut:
    """How a transposed product is cut over the grid of tiles: the inputs into ``blocks`` of
    ``block`` values, the partial products summed over grid axis ``summed``, ``kept`` blocks of
    outputs side by side; each tile's output count, and the product's width."""

    blocks: int
    block: int
    summed: int
    kept: int
    outputs: list[int]
    features: int
