"""Where each layer's weight blocks sit on a board's tiles, decided before anything is programmed.

A layer's logical matrix is cut into blocks of at most rows x cols (inputs on rows, outputs on
columns). Unpacked, every block has a tile of its own, in module order: LeNet-5 takes 18 tiles
of 64x64 although its first convolution fills 150 of a tile's 4,096 devices. Packed, small
blocks sit side by side on one tile, each at a row and column offset, and run their products on
that window of the tile (``TileGroup.forward(..., windows=...)``). Layers named in
``host_layers`` stay digital on the host. ``convert_to_analog`` takes the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cim_hil.errors import ConfigError, PlacementError
from cim_hil.tile import Window


@dataclass(frozen=True)
class LayerShape:
    """A Linear or Conv2d layer as the tiles see it: ``inputs`` rows by ``outputs`` columns."""

    name: str
    kind: str
    inputs: int
    outputs: int

    @property
    def weights(self) -> int:
        return self.inputs * self.outputs

    def label(self) -> str:
        return f"{self.name} ({self.kind} {self.inputs}x{self.outputs})"


@dataclass(frozen=True)
class Block:
    """Block ``grid`` = (row block, column block) of layer ``layer``: ``rows`` of its inputs by
    ``cols`` of its outputs, on board tile ``tile`` with its first device at (``row``, ``col``)."""

    layer: str
    grid: tuple[int, int]
    rows: int
    cols: int
    tile: int
    row: int
    col: int

    @property
    def window(self) -> Window:
        return (self.row, self.row + self.rows, self.col, self.col + self.cols)


@dataclass(frozen=True)
class Placement:
    """A plan: every analog layer's blocks on tiles of ``rows`` x ``cols``, and the host layers."""

    rows: int
    cols: int
    layers: tuple[LayerShape, ...]
    blocks: tuple[Block, ...]
    host: tuple[str, ...]
    packed: bool

    @property
    def tiles_used(self) -> int:
        return max((block.tile for block in self.blocks), default=-1) + 1

    @property
    def analog(self) -> tuple[LayerShape, ...]:
        return tuple(layer for layer in self.layers if layer.name not in self.host)

    def blocks_of(self, layer: str) -> list[Block]:
        """The layer's blocks in row-major grid order (what ``TileMapping`` takes)."""
        return sorted((block for block in self.blocks if block.layer == layer), key=lambda block: block.grid)

    def shares_tiles(self, layer: str) -> bool:
        """Whether another layer has a block on one of this layer's tiles."""
        mine = {block.tile for block in self.blocks if block.layer == layer}
        return any(block.tile in mine for block in self.blocks if block.layer != layer)

    def device_use(self) -> list[int]:
        """Devices holding a weight, tile by tile."""
        use = [0] * self.tiles_used
        for block in self.blocks:
            use[block.tile] += block.rows * block.cols
        return use

    def tiles_needed(self, packed: bool) -> int:
        """Tiles the same analog layers take packed or unpacked."""
        if packed == self.packed:
            return self.tiles_used
        return plan_shapes(self.layers, self.rows, self.cols, packed, self.host).tiles_used

    def as_dict(self) -> dict:
        """What a run's metadata records of the plan."""
        return {
            "tile_shape": [self.rows, self.cols],
            "packed": self.packed,
            "tiles": self.tiles_used,
            "tiles_unpacked": self.tiles_needed(False),
            "tiles_packed": self.tiles_needed(True),
            "host_layers": [layer.label() for layer in self.layers if layer.name in self.host],
            "analog_layers": {
                layer.label(): [[block.tile, block.row, block.col, block.rows, block.cols]
                                for block in self.blocks_of(layer.name)]
                for layer in self.analog
            },
        }

    def summary(self) -> str:
        """One line: tiles used, packed or not, the host layers."""
        host = [layer.label() for layer in self.layers if layer.name in self.host]
        return (f"{self.tiles_used} tiles of {self.rows}x{self.cols}, {'packed' if self.packed else 'one block per tile'}"
                f"; on the host: {', '.join(host) if host else 'nothing'}")

    def describe(self) -> str:
        """A table for people: each layer's blocks, each tile's device use, the tile counts."""
        lines = [
            f"placement on {self.rows}x{self.cols} tiles ({'packed' if self.packed else 'one block per tile'}): "
            f"{self.tiles_used} tiles; {self.tiles_needed(True)} packed, {self.tiles_needed(False)} unpacked",
            "",
            f"{'layer':<28} {'blocks':>6}  where (tile @ row,col: rows x cols)",
        ]
        for layer in self.layers:
            if layer.name in self.host:
                lines.append(f"{layer.label():<28} {'-':>6}  on the host (digital)")
                continue
            blocks = self.blocks_of(layer.name)
            where = ", ".join(f"{b.tile}@{b.row},{b.col}: {b.rows}x{b.cols}" for b in blocks)
            lines.append(f"{layer.label():<28} {len(blocks):>6}  {where}")
        lines += ["", f"{'tile':>4} {'devices used':>13} {'of':>6} {'fill':>7}"]
        per_tile = self.rows * self.cols
        for tile, used in enumerate(self.device_use()):
            lines.append(f"{tile:>4} {used:>13} {per_tile:>6} {used / per_tile:>7.1%}")
        return "\n".join(lines)


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """The model's Linear and Conv2d layers in module order, as the tiles see them."""
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shapes.append(LayerShape(name, "Linear", module.in_features, module.out_features))
        elif isinstance(module, nn.Conv2d):
            inputs = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            shapes.append(LayerShape(name, "Conv2d", inputs, module.out_channels))
    return shapes


def plan_placement(
    model: nn.Module, rows: int, cols: int, pack: bool = True, host_layers: list[str] | tuple[str, ...] = (),
    tiles: int | None = None, where: str = "the board",
) -> Placement:
    """Place ``model``'s Linear and Conv2d layers on tiles of ``rows`` x ``cols``, packed or one
    block per tile, keeping ``host_layers`` (module names) on the host. With ``tiles`` (what the
    board has; ``where`` names it), a plan that needs more raises :class:`PlacementError`
    listing the ways out."""
    shapes = layer_shapes(model)
    names = [shape.name for shape in shapes]
    unknown = [name for name in host_layers if name not in names]
    if unknown:
        raise ConfigError(f"host_layers {unknown} are not Linear or Conv2d layers of the model; "
                          f"those are: {', '.join(shape.label() for shape in shapes)}")
    placement = plan_shapes(shapes, rows, cols, pack, tuple(host_layers))
    if tiles is not None and placement.tiles_used > tiles:
        raise PlacementError(_ways_out(placement, tiles, where))
    return placement


def plan_for_board(model: nn.Module, board, pack: bool | None = None,
                   host_layers: list[str] | tuple[str, ...] | str = ()) -> Placement:
    """The plan for ``model`` on ``board`` (a ``Board``): ``pack`` None packs only when one
    block per tile does not fit; ``host_layers`` ``"auto"`` keeps the largest layers on the
    host until the rest fits, packed."""
    spec, tiles, where = board[0].spec, len(board), f"the board at {board.url}"
    host = fitting_host_layers(model, spec.rows, spec.cols, tiles) if host_layers == "auto" else tuple(host_layers)
    if pack is None:
        pack = host_layers == "auto" or plan_placement(model, spec.rows, spec.cols, False, host).tiles_used > tiles
    return plan_placement(model, spec.rows, spec.cols, pack, host, tiles, where)


def fitting_host_layers(model: nn.Module, rows: int, cols: int, tiles: int,
                        keep: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The layers to keep on the host, largest first, until the rest fits ``tiles`` packed;
    ``keep`` are kept there in any case."""
    return _fitting_host(layer_shapes(model), rows, cols, tiles, tuple(keep))


def _fitting_host(shapes: list[LayerShape], rows: int, cols: int, tiles: int, keep: tuple[str, ...]) -> tuple[str, ...]:
    host = list(keep)
    for shape in sorted(shapes, key=lambda shape: -shape.weights):
        if plan_shapes(shapes, rows, cols, True, tuple(host)).tiles_used <= tiles:
            break
        if shape.name not in host:
            host.append(shape.name)
    return tuple(shape.name for shape in shapes if shape.name in host)


def plan_shapes(shapes: list[LayerShape] | tuple[LayerShape, ...], rows: int, cols: int, pack: bool,
                host: tuple[str, ...] = ()) -> Placement:
    pieces = []  # (layer, grid, rows, cols) of every analog block in module order
    for shape in shapes:
        if shape.name in host:
            continue
        row_blocks, col_blocks = math.ceil(shape.inputs / rows), math.ceil(shape.outputs / cols)
        for r in range(row_blocks):
            for c in range(col_blocks):
                pieces.append((shape.name, (r, c), min(rows, shape.inputs - r * rows), min(cols, shape.outputs - c * cols)))
    if pack:
        kinds = {shape.name: shape.kind for shape in shapes}
        first = [index for index, piece in enumerate(pieces) if kinds[piece[0]] == "Conv2d"]
        spots = _pack([(height, width) for _, _, height, width in pieces], rows, cols, first)
    else:
        spots = [(index, 0, 0) for index in range(len(pieces))]
    blocks = tuple(Block(name, grid, height, width, *spot) for (name, grid, height, width), spot in zip(pieces, spots))
    return Placement(rows, cols, tuple(shapes), blocks, tuple(host), pack)


def _pack(sizes: list[tuple[int, int]], rows: int, cols: int, first: list[int]) -> list[tuple[int, int, int]]:
    """(tile, row, col) for each block of ``sizes`` (height, width): the blocks ``first`` names
    in that order, then the largest first, each into the free rectangle it fills best (a
    guillotine packer: a placed block splits its free rectangle in two along the shorter
    leftover side); a new tile when none fits.

    The convolutions' blocks go first (the earliest at a tile's corner): a convolution runs a
    product per patch, hundreds per image, and a window away from the corner costs every one
    of them the zeros before it on a link that does not carry windows."""
    free: list[tuple[int, int, int, int, int]] = []  # (tile, row, col, height, width)
    spots: list[tuple[int, int, int] | None] = [None] * len(sizes)
    tiles = 0
    rest = sorted(set(range(len(sizes))) - set(first), key=lambda i: (-sizes[i][0] * sizes[i][1], -sizes[i][0], -sizes[i][1], i))
    for index in first + rest:
        height, width = sizes[index]
        fits = [spot for spot in free if spot[3] >= height and spot[4] >= width]
        if not fits:
            free.append((tiles, 0, 0, rows, cols))
            tiles += 1
            fits = [free[-1]]
        spot = min(fits, key=lambda f: (f[3] * f[4] - height * width, f[0], f[1], f[2]))
        free.remove(spot)
        tile, row, col, free_height, free_width = spot
        spots[index] = (tile, row, col)
        right, below = free_width - width, free_height - height
        if right < below:  # cut across: the strip beside the block is as tall as the block
            parts = [(tile, row, col + width, height, right), (tile, row + height, col, below, free_width)]
        else:  # cut down: the strip below the block is as wide as the block
            parts = [(tile, row, col + width, free_height, right), (tile, row + height, col, below, width)]
        free += [part for part in parts if part[3] and part[4]]
    return spots  # type: ignore[return-value]


def _ways_out(placement: Placement, tiles: int, where: str) -> str:
    unpacked, packed = placement.tiles_needed(False), placement.tiles_needed(True)
    needed = f"the model needs {unpacked} tiles of {placement.rows}x{placement.cols}"
    if packed != unpacked:
        needed += f" ({packed} packed)"
    if placement.host:
        needed += f" with {', '.join(placement.host)} on the host"
    ways = []
    if not placement.packed and packed <= tiles:
        ways.append("pack small blocks side by side (pack = true, cim-hil train --pack)")
    host = _fitting_host(list(placement.layers), placement.rows, placement.cols, tiles, placement.host)
    if len(host) > len(placement.host) and len(host) < len(placement.layers):
        ways.append(f"keep layers {', '.join(host)} on the host (host_layers, cim-hil train --host-layers "
                    f"{','.join(host)}), packing the rest")
    ways.append(f"a board with at least {packed} tiles (for the emulator: emulator:?tiles={packed})")
    ways.append(f"a composite board: {where} plus emulated tiles, or several boards "
                f"(composite:URL1|URL2|..., see the README)")
    return f"{needed}, {where} has {tiles}; ways out: " + "; ".join(ways)


def plot_placement(placement: Placement, path: str | Path) -> Path:
    """A picture of the tiles and their blocks, one colour per layer, host layers listed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = max(placement.tiles_used, 1)
    across = min(count, 6)
    down = math.ceil(count / across)
    figure, axes = plt.subplots(down, across, figsize=(2.2 * across + 1.5, 2.6 * down + 0.9), squeeze=False)
    colours = plt.get_cmap("tab10")
    analog = [layer.name for layer in placement.analog]
    use = placement.device_use()
    for tile, ax in enumerate(axes.flat):
        if tile >= placement.tiles_used:
            ax.axis("off")
            continue
        ax.add_patch(Rectangle((0, 0), placement.cols, placement.rows, fill=False, lw=1.2))
        for block in (b for b in placement.blocks if b.tile == tile):
            colour = colours(analog.index(block.layer) % 10)
            ax.add_patch(Rectangle((block.col, block.row), block.cols, block.rows, facecolor=colour, alpha=0.8,
                                   edgecolor="white", lw=1.0))
            ax.text(block.col + block.cols / 2, block.row + block.rows / 2, f"{block.layer}\n{block.grid[0]},{block.grid[1]}",
                    ha="center", va="center", fontsize=6)
        ax.set_xlim(0, placement.cols)
        ax.set_ylim(placement.rows, 0)  # row 0 at the top, as a crossbar is drawn
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"tile {tile}: {use[tile] / (placement.rows * placement.cols):.0%}", fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=colours(i % 10), alpha=0.75) for i in range(len(analog))]
    labels = [layer.label() for layer in placement.analog]
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=7, frameon=False)
    host = ", ".join(layer.label() for layer in placement.layers if layer.name in placement.host)
    figure.suptitle(f"{placement.tiles_used} tiles of {placement.rows}x{placement.cols} "
                    f"({'packed' if placement.packed else 'unpacked'})" + (f"; on the host: {host}" if host else ""),
                    fontsize=9)
    figure.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)
    return path
