"""Several tiles of one board worked as one: what a layer spread over many tiles runs on.

A board hands out groups (``board.group(tiles)``). A group is validated once, when it is made
(one spec, one backend), and offers the Tile calls on all its tiles at once: batched products
and batched programming, with the numbers each tile gives alone. This class is the plain
version, one tile after the other through the tiles' own hooks; a backend that can do better
(the emulator, one tensor operation for the whole group) supplies a subclass, which tests
compare with this one bit for bit.

Shapes: a group of n tiles of ``rows x cols`` takes inputs (n, batch, k), one block per tile,
and programs targets (n, rows, cols). A place is a device's flat index in that stack. A group
may name a tile more than once (blocks of several layers packed on one tile, each on its
window); such a group runs products only, since one array must not be written twice in a call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cim_hil.errors import ShapeError
from cim_hil.layer_products import Convolution, LayerCut, products_of_blocks
from cim_hil.tile import Capability, ProgramResult, Tile, Window, require_finite

if TYPE_CHECKING:
    from cim_hil.board import Board


class TileGroup:
    """Tiles of one board with one spec, run together; ``board`` is the board that made it."""

    def __init__(self, tiles: Sequence[Tile], board: Board | None = None) -> None:
        tiles = tuple(tiles)
        if not tiles:
            raise ShapeError("a group needs at least one tile")
        spec = tiles[0].spec
        if any(tile.spec is not spec and tile.spec != spec for tile in tiles):
            raise ShapeError("the tiles of a group must share one spec (tiles of one board)")
        self.tiles, self.spec, self.board = tiles, spec, board
        self.distinct = len({id(tile) for tile in tiles}) == len(tiles)
        self.places = len(tiles) * spec.rows * spec.cols

    def __len__(self) -> int:
        return len(self.tiles)

    # ---- products -------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, outputs: Sequence[int] | None = None, windows: Sequence[Window] | None = None,
    ) -> torch.Tensor:
        """Tile i's column currents (uA) for inputs ``x[i]``: ``x`` is (tiles, batch, k), k <=
        rows, and tile i converts its first ``outputs[i]`` columns (all if None). Returns
        (tiles, batch, max(outputs)), zero beyond each tile's outputs.

        ``windows`` (one (row_start, row_stop, col_start, col_stop) per tile) runs entry i on a
        window of its tile, as ``forward(x, outputs, origin)`` would: its first inputs drive the
        window's rows, those beyond the window are ignored, every other row is held at 0 V,
        and its outputs are converted from the window's first column.
        """
        if not self.spec.supports(Capability.COMPUTED_PRODUCTS):
            self._require(Capability.ANALOG_PRODUCTS)
        return self._checked_products(x, outputs, False, windows)

    def backward(
        self, d: torch.Tensor, outputs: Sequence[int] | None = None, windows: Sequence[Window] | None = None,
    ) -> torch.Tensor:
        """Row currents for column inputs, as :meth:`forward` with rows and columns swapped."""
        self._require(Capability.TRANSPOSE)
        return self._checked_products(d, outputs, True, windows)

    def _checked_products(
        self, x: torch.Tensor, outputs: Sequence[int] | None, transpose: bool, windows: Sequence[Window] | None,
    ) -> torch.Tensor:
        width, widths = (self.spec.cols, self.spec.rows) if transpose else (self.spec.rows, self.spec.cols)
        x = torch.as_tensor(x)
        if x.ndim != 3 or x.shape[0] != len(self) or not 1 <= x.shape[2] <= width:
            raise ShapeError(f"inputs must have shape ({len(self)}, batch, k) with 1 <= k <= {width}, "
                             f"got {tuple(x.shape)}")
        outputs = [widths] * len(self) if outputs is None else list(outputs)
        if len(outputs) != len(self):
            raise ShapeError(f"outputs must give one width per tile ({len(self)}), got {len(outputs)}")
        outputs = [Tile._outputs(width, widths) for width in outputs]
        if windows is not None:
            if len(windows) != len(self):
                raise ShapeError(f"windows must give one window per tile ({len(self)}), got {len(windows)}")
            windows = [tile._window(window) for tile, window in zip(self.tiles, windows)]
            for (r0, r1, c0, c1), width in zip(windows, outputs):
                if width > ((r1 - r0) if transpose else (c1 - c0)):
                    raise ShapeError(f"{width} outputs do not fit the window {(r0, r1, c0, c1)}")
        require_finite(x, "inputs contain")
        return self._products_on(x, outputs, transpose, False, windows)

    def _products_on(
        self, x: torch.Tensor, outputs: list[int], transpose: bool, in_range: bool, windows: list[Window] | None,
    ) -> torch.Tensor:
        """Products of checked inputs on checked ``windows`` (whole tiles if None): each entry's
        inputs padded with zeros up to its window, its outputs converted up to the window's end
        and the ones before it dropped, as a lone tile's windowed product (``pad_inputs``)."""
        if windows is None:
            return self._products(x, outputs, transpose, in_range)
        padded, wide, firsts = padded_to_windows(x, outputs, transpose, windows)
        return cut_to_windows(self._products(padded, wide, transpose, in_range), outputs, firsts)

    @property
    def reads_windows(self) -> bool:
        """Whether the backend is sent a window itself rather than the padding it stands for
        (a serial board whose firmware reads windows); the plain group pads."""
        return False

    def _products(self, x: torch.Tensor, outputs: list[int], transpose: bool, in_range: bool) -> torch.Tensor:
        """The backend hook for products of checked inputs. ``in_range``: the caller has put
        every input in [-1, 1] itself, so a backend need not clamp them; the plain loop hands
        each tile its block through the tile's own hook, which clamps regardless."""
        result = torch.zeros(len(self), x.shape[1], max(outputs))
        for index, (tile, inputs, width) in enumerate(zip(self.tiles, x, outputs)):
            product = tile._backward if transpose else tile._forward
            result[index, :, :width] = product(inputs, width).cpu()
        return result

    def _layer_products(
        self, cut: LayerCut, codes: torch.Tensor, convolution: Convolution | None,
        origins: list[tuple[int, int]] | None,
    ) -> torch.Tensor:
        """The backend hook for a whole layer's checked products (see ``layer_products``): the
        plain version cuts the patches on the host and runs the group's products."""
        return products_of_blocks(self, cut, codes, convolution, origins)

    # ---- programming ----------------------------------------------------------------------
    def program_verify(
        self, targets_us: torch.Tensor, mask: torch.Tensor | None = None, tolerance_us: float | None = None,
        max_trials: int | None = None,
    ) -> ProgramResult:
        """Write-verify tile i's weight devices selected by ``mask[i]`` (all if None) to
        ``targets_us[i]``; both (tiles, rows, cols). Every target is checked before any tile is
        programmed; the result stacks the tiles' (NaN reads where nothing was asked)."""
        self._require(Capability.WRITE_VERIFY)
        self._require_distinct()
        return self._program_masked(targets_us, mask, False, tolerance_us, max_trials)

    def program_reference(
        self, targets_us: torch.Tensor, mask: torch.Tensor | None = None, tolerance_us: float | None = None,
        max_trials: int | None = None,
    ) -> ProgramResult:
        """As :meth:`program_verify`, for the tiles' reference devices (zero-shifting)."""
        self._require(Capability.REFERENCE)
        self._require_distinct()
        return self._program_masked(targets_us, mask, True, tolerance_us, max_trials)

    def program_places(
        self, places: torch.Tensor, targets_us: torch.Tensor, reference: bool | torch.Tensor = False,
        tolerance_us: float | None = None, max_trials: int | None = None,
    ) -> ProgramResult:
        """Write-verify named devices of any of the tiles, weight or reference, in one call.

        ``places`` (k,) are flat indices into the stack (tiles, rows, cols), each device at most
        once; ``targets_us`` (k,) their targets; ``reference`` (a bool, or one per place)
        whether it is the reference device at that place rather than the weight device. Every
        target is checked before any device is programmed; the result holds one entry per
        place, in the order given. A training step programs a few hundred devices spread over
        every tile of a model: naming them costs a fraction of sending whole tiles with masks.
        """
        self._require_distinct()
        places = torch.as_tensor(places)
        targets = torch.as_tensor(targets_us).to(torch.float32)
        if places.ndim != 1 or places.is_floating_point() or places.dtype == torch.bool:
            raise ShapeError(f"places must be a 1-D integer tensor, got {places.dtype} of shape {tuple(places.shape)}")
        if targets.shape != places.shape:
            raise ShapeError(f"targets must have one entry per place ({len(places)}), got {tuple(targets.shape)}")
        reference = torch.as_tensor(reference, dtype=torch.bool).expand(places.shape)
        references = int(reference.sum())
        if not 0 < references == len(places):
            self._require(Capability.WRITE_VERIFY)
        if references:
            self._require(Capability.REFERENCE)
        places = places.to(torch.int64)
        if places.numel():
            lowest, highest = torch.aminmax(places)
            if int(lowest) < 0 or int(highest) >= self.places:
                raise ShapeError(f"places must lie in [0, {self.places}) for {len(self)} tiles")
            key = places + reference * self.places
            if key.unique().numel() != key.numel():
                raise ShapeError("a device is named more than once; nothing was programmed")
        first = self.tiles[0]
        first._check_targets(targets)
        tolerance, trials = first._verify_limits(tolerance_us, max_trials)
        return self._program_places(places, targets, reference, tolerance, trials)

    def _program_places(
        self, places: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor, tolerance_us: float,
        max_trials: int,
    ) -> ProgramResult:
        """The backend hook for checked named writes: one tile after the other, its weight
        devices then its reference devices, each as one ``_program_verify`` of the tile."""
        rows, cols = self.spec.rows, self.spec.cols
        reached = torch.full(places.shape, float("nan"))
        trials = torch.zeros(places.shape, dtype=torch.int64)
        failed = torch.zeros(places.shape, dtype=torch.bool)
        tile_of, place = places.div(rows * cols, rounding_mode="floor"), places % (rows * cols)
        for index, tile in enumerate(self.tiles):
            for is_reference in (False, True):
                chosen = ((tile_of == index) & (reference == is_reference)).nonzero().squeeze(1)
                if not chosen.numel():
                    continue
                mask = torch.zeros(rows * cols, dtype=torch.bool)
                mask[place[chosen]] = True
                tile_targets = torch.full((rows * cols,), tile.spec.g_min_us)
                tile_targets[place[chosen]] = targets[chosen]
                result = tile._program_verify(
                    tile_targets.view(rows, cols), mask.view(rows, cols), tolerance_us, max_trials, is_reference
                )
                for into, values in ((reached, result.reached_us), (trials, result.trials), (failed, result.failed)):
                    into[chosen] = values.cpu().flatten()[place[chosen]]
        return ProgramResult(reached, trials, failed, tolerance_us)

    def _program_masked(
        self, targets_us: torch.Tensor, mask: torch.Tensor | None, reference: bool, tolerance_us: float | None,
        max_trials: int | None,
    ) -> ProgramResult:
        targets, mask, tolerance, trials = self.tiles[0]._program_args(
            targets_us, mask, tolerance_us, max_trials, len(self))
        return program_masked(self, targets, mask, reference, tolerance, trials)

    def _require(self, capability: Capability) -> None:
        self.tiles[0]._require(capability)

    def _require_distinct(self) -> None:
        if not self.distinct:
            raise ShapeError("this group names a tile more than once: it runs products only (one array must not "
                             "be written twice in one call); program through a group of distinct tiles")


def padded_to_windows(
    x: torch.Tensor, outputs: list[int], transpose: bool, windows: list[Window],
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Entry i's inputs ``x[i]`` placed on its window's lines, zeros before (and the inputs past
    the window dropped), all as wide as the widest: (padded inputs, the outputs to convert up to
    each window's end, each window's first output)."""
    k = x.shape[2]
    starts, firsts, driven = [], [], []
    for (r0, r1, c0, c1) in windows:
        (start, stop), first = ((c0, c1), r0) if transpose else ((r0, r1), c0)
        starts.append(start)
        firsts.append(first)
        driven.append(min(k, stop - start))
    padded = x.new_zeros(len(windows), x.shape[1], max(s + d for s, d in zip(starts, driven)))
    for entry, inputs, start, count in zip(padded, x, starts, driven):
        entry[:, start : start + count] = inputs[:, :count]
    return padded, [first + width for first, width in zip(firsts, outputs)], firsts


def cut_to_windows(result: torch.Tensor, outputs: list[int], firsts: list[int]) -> torch.Tensor:
    """The padded products' outputs from each window's first: (entries, batch, max(outputs))."""
    out = result.new_zeros(len(outputs), result.shape[1], max(outputs))
    for index, (first, width) in enumerate(zip(firsts, outputs)):
        out[index, :, :width] = result[index, :, first : first + width]
    return out


def program_masked(
    group: TileGroup, targets: torch.Tensor, mask: torch.Tensor, reference: bool, tolerance_us: float, max_trials: int,
) -> ProgramResult:
    """Checked masked writes through ``group._program_places``: ``targets`` and ``mask`` are
    (tiles, rows, cols), or (rows, cols) for a group of one tile, and so is the result: NaN
    reads, no trials and no failures where nothing was asked."""
    chosen = mask.flatten().nonzero().squeeze(1)
    result = group._program_places(
        chosen, targets.flatten()[chosen], torch.full(chosen.shape, reference), tolerance_us, max_trials
    )
    device = result.reached_us.device
    reached = torch.full(targets.shape, float("nan"), device=device)
    trials = torch.zeros(targets.shape, dtype=torch.int64, device=device)
    failed = torch.zeros(targets.shape, dtype=torch.bool, device=device)
    reached.view(-1)[chosen], trials.view(-1)[chosen], failed.view(-1)[chosen] = (
        result.reached_us, result.trials, result.failed
    )
    return ProgramResult(reached, trials, failed, tolerance_us)
