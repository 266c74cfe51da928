"""A logical weight matrix spread over fixed-size tiles, and its weight <-> conductance map.

The logical matrix W has shape (out_features, in_features); a tile holds a block of W
transposed (rows = inputs, cols = outputs), and partial products of the blocks along the
input dimension are summed on the host. Weights are W = (G - G_ref) * scale.

The host keeps what it believes is programmed: the level index of every device (write-verify)
or the nominal weight (pulses). Programming reports exactly what each device took, so the
trainer can account for it.
"""

from __future__ import annotations

import math

import torch

from cim_hil.errors import CapabilityError, ConfigError
from cim_hil.nn.config import MappingConfig
from cim_hil.tile import Capability, Tile, averaged_read


def tiles_needed(in_features: int, out_features: int, rows: int, cols: int) -> int:
    return math.ceil(in_features / rows) * math.ceil(out_features / cols)


class TileMapping:
    def __init__(
        self, in_features: int, out_features: int, tiles: list[Tile], config: MappingConfig, initial: torch.Tensor
    ) -> None:
        spec = tiles[0].spec
        self.spec, self.config = spec, config
        self.in_features, self.out_features = in_features, out_features
        self.row_blocks = math.ceil(in_features / spec.rows)
        self.col_blocks = math.ceil(out_features / spec.cols)
        assert len(tiles) == self.row_blocks * self.col_blocks
        self.tiles = tiles
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
            raise CapabilityError(f"the board's tiles lack {', '.join(missing)} needed by this mapping")

    @property
    def analog_backward(self) -> bool:
        if self.config.backward == "auto":
            return self.spec.supports(Capability.TRANSPOSE)
        return self.config.backward == "analog"

    # ---- block bookkeeping ----------------------------------------------------------------
    def _blocks(self):
        """(tile, input slice, output slice) for every block."""
        rows, cols = self.spec.rows, self.spec.cols
        for r in range(self.row_blocks):
            for c in range(self.col_blocks):
                ins = slice(r * rows, min((r + 1) * rows, self.in_features))
                outs = slice(c * cols, min((c + 1) * cols, self.out_features))
                yield self.tiles[r * self.col_blocks + c], ins, outs

    def _on_tile(self, block: torch.Tensor, fill) -> torch.Tensor:
        """A logical (out, in) block as a full (rows, cols) tile matrix, padded with ``fill``."""
        full = torch.full((self.spec.rows, self.spec.cols), fill, dtype=block.dtype)
        full[: block.shape[1], : block.shape[0]] = block.T
        return full

    @staticmethod
    def _off_tile(full: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The logical (out, in) block of ``shape`` back from a tile matrix."""
        return full[: shape[1], : shape[0]].T.cpu()

    # ---- weights <-> levels ---------------------------------------------------------------
    def levels_for(self, weights: torch.Tensor) -> torch.Tensor:
        """Nearest weight level (relative to the reference) of each weight, within range."""
        step = self.spacing * self.scale
        return torch.round(weights / step).clamp(self.low, self.high).to(torch.int64)

    def weights_for(self, levels: torch.Tensor) -> torch.Tensor:
        return levels.to(torch.float32) * self.spacing * self.scale

    def _device_levels(self, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute device levels (plus device, reference device) for relative weight levels."""
        if self.config.differential:
            return levels.clamp(min=0), (-levels).clamp(min=0)
        return levels + self.ref_level, torch.full_like(levels, self.ref_level)

    def _conductance(self, device_levels: torch.Tensor) -> torch.Tensor:
        conductance = self.spec.g_min_us + device_levels.to(torch.float32) * self.spacing
        return conductance.clamp(self.spec.g_min_us, self.spec.g_max_us)  # float rounding at the top

    def _level_of(self, conductance: torch.Tensor) -> torch.Tensor:
        top = self.spec.levels - 1
        return torch.round((conductance - self.spec.g_min_us) / self.spacing).clamp(0, top).to(torch.int64)

    # ---- programming ----------------------------------------------------------------------
    def program_levels(self, levels: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Write-verify the devices whose level changes from ``previous`` (all if None).

        Returns the relative levels the devices actually reached, read back after verify.
        """
        plus, minus = self._device_levels(levels)
        old_plus, old_minus = self._device_levels(previous) if previous is not None else (None, None)
        reached_plus, reached_minus = plus.clone(), minus.clone()
        for tile, ins, outs in self._blocks():
            block = (outs, ins)
            reached_plus[block] = self._program_block(tile, plus[block], None if old_plus is None else old_plus[block], reference=False)
            if self.spec.supports(Capability.REFERENCE) and (previous is None or self.config.differential):
                reached_minus[block] = self._program_block(
                    tile, minus[block], None if old_minus is None else old_minus[block], reference=True
                )
        if self.config.differential:
            return reached_plus - reached_minus
        return reached_plus - self.ref_level

    def _program_block(self, tile: Tile, wanted: torch.Tensor, before: torch.Tensor | None, reference: bool) -> torch.Tensor:
        change = torch.ones_like(wanted, dtype=torch.bool) if before is None else wanted != before
        if not change.any():
            return wanted
        targets = self._on_tile(self._conductance(wanted), self.spec.g_min_us)
        mask = self._on_tile(change, False)
        program = tile.program_reference if reference else tile.program_verify
        result = program(targets, mask=mask)
        reached = self._off_tile(self._level_of(torch.nan_to_num(result.reached_us.cpu(), nan=0.0)), wanted.shape)
        return torch.where(change, reached, wanted)

    def program_pulses(self, counts: torch.Tensor) -> torch.Tensor:
        """Apply signed pulse counts (out, in); returns the counts the tiles applied."""
        applied = torch.zeros_like(counts)
        for tile, ins, outs in self._blocks():
            block = counts[outs, ins]
            if block.any():
                done = tile.apply_pulses(self._on_tile(block, 0))
                applied[outs, ins] = self._off_tile(done, block.shape)
        return applied

    def program_weights_open_loop(self, weights: torch.Tensor, reference_reads: int = 8) -> torch.Tensor:
        """Pulse mode start: write-verify each device to its reference + W / scale; returns the
        nominal W. References go to mid-range first, unless they are kept as calibrated."""
        middle = float(self._conductance(torch.tensor(self.ref_level)))
        calibrated = self.config.reference == "calibrated"
        reference = torch.full_like(weights, middle)
        for tile, ins, outs in self._blocks():
            if calibrated:
                measured = averaged_read(tile.read_reference, reference_reads)
                reference[outs, ins] = self._off_tile(measured, weights[outs, ins].shape)
            elif self.spec.supports(Capability.REFERENCE):
                tile.program_reference(torch.full((self.spec.rows, self.spec.cols), middle))
        targets = (reference + weights / self.scale).clamp(self.spec.g_min_us, self.spec.g_max_us)
        for tile, ins, outs in self._blocks():
            block = targets[outs, ins]
            used = self._on_tile(torch.ones_like(block, dtype=torch.bool), False)
            tile.program_verify(self._on_tile(block, self.spec.g_min_us), mask=used)
        return (targets - reference) * self.scale

    # ---- products -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_features) -> x @ W.T (N, out_features), the products run on the tiles."""
        return self._products(x, transpose=False)

    def backward(self, d: torch.Tensor) -> torch.Tensor:
        """d (N, out_features) -> d @ W (N, in_features) with transpose products on the tiles."""
        return self._products(d, transpose=True)

    def _products(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        # Scale each sample to the DAC's full range, as the host driver of the chip does.
        peak = x.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        normalised = (x.detach() / peak).cpu()
        width = self.in_features if transpose else self.out_features
        out = torch.zeros(x.shape[0], width)
        for tile, ins, outs in self._blocks():
            src, dst = (outs, ins) if transpose else (ins, outs)
            size = self.spec.cols if transpose else self.spec.rows
            chunk = torch.zeros(x.shape[0], size)
            chunk[:, : src.stop - src.start] = normalised[:, src]
            currents = tile.backward(chunk) if transpose else tile.forward(chunk)
            out[:, dst] += currents[:, : dst.stop - dst.start].cpu()
        return (out.to(x.device) * (peak * self.scale / self.spec.v_read)).to(x.dtype)
