"""Boards hold tiles and a link; ``open_board`` opens any of them from one URL-like string.

In the spirit of pyserial's ``serial_for_url``: ``emulator:`` opens the in-process emulator;
driver packages register further schemes (serial ports, ``socket://``, VISA resources).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cim_hil.errors import BoardError
from cim_hil.group import TileGroup
from cim_hil.tile import Counters, Tile


class Board:
    """A set of tiles behind one link. Use it as a context manager so the link always closes.

    ``group_type`` is the class of the groups :meth:`group` hands out: the plain loop, or a
    backend's own that runs a group's tiles at once.
    """

    def __init__(
        self, tiles: list[Tile], url: str, info: dict[str, Any] | None = None, group_type: type[TileGroup] = TileGroup,
    ) -> None:
        if not tiles:
            raise BoardError(f"board at {url} reports no tiles")
        self.tiles = tiles
        self.url = url
        self._info = dict(info or {})
        self._group_type = group_type

    def group(self, tiles: Sequence[Tile]) -> TileGroup:
        """Some of this board's tiles to run as one (see :class:`~cim_hil.group.TileGroup`)."""
        mine = {id(tile) for tile in self.tiles}
        if not all(id(tile) in mine for tile in tiles):
            raise BoardError(f"a group takes tiles of the board at {self.url} only")
        return self._group_type(tiles, self)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> Tile:
        return self.tiles[index]

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    @property
    def counters(self) -> Counters:
        # Read each tile's counters once: on a serial board every read is a round trip.
        each = [tile.counters for tile in self.tiles]
        total = Counters(clock_hz=each[0].clock_hz)
        for counters in each:
            total = total + counters
        return total

    def info(self) -> dict[str, Any]:
        spec = self.tiles[0].spec
        return {
            "url": self.url,
            "tiles": len(self.tiles),
            "rows": spec.rows,
            "cols": spec.cols,
            "input_bits": spec.input_bits,
            "output_bits": spec.output_bits,
            "g_range_us": [spec.g_min_us, spec.g_max_us],
            "levels": spec.levels,
            "capabilities": sorted(str(c) for c in spec.capabilities),
            **self._info,
        }

    def state_dict(self) -> dict[str, Any] | None:
        """The emulated device state, for checkpoints; None for real hardware, whose devices
        keep their own state."""
        if not all(hasattr(tile, "state_dict") for tile in self.tiles):
            return None
        return {"url": self.url, "tiles": [tile.state_dict() for tile in self.tiles]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if len(state["tiles"]) != len(self.tiles):
            raise BoardError(f"checkpoint holds {len(state['tiles'])} tiles, the board has {len(self.tiles)}")
        for tile, tile_state in zip(self.tiles, state["tiles"]):
            tile.load_state_dict(tile_state)

    def close(self) -> None:
        """Release the link; the emulator has none."""

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Opener = Callable[[str, Any], Board]
_schemes: dict[str, Opener] = {}


def register_scheme(prefix: str, opener: Opener) -> None:
    """Let ``open_board`` hand URLs starting with ``prefix`` to ``opener(url, config)``."""
    _schemes[prefix] = opener


def open_board(url: str = "emulator:", config: Any = None) -> Board:
    """Open a board from a URL-like string.

    ``emulator:`` (optionally ``emulator:?tiles=8&rows=128&cols=128&seed=3`` or
    ``emulator:path/to/config.toml``) opens the cycle-accurate emulator of the reference SoC;
    ``config`` may be an :class:`~cim_hil.config.EmulatorConfig` to start from.
    """
    _load_driver_schemes()
    for prefix, opener in _schemes.items():
        if url.startswith(prefix):
            return opener(url, config)
    known = ", ".join(sorted(_schemes))
    raise BoardError(f"no driver for board URL {url!r}; known schemes: {known}")


def _load_driver_schemes() -> None:
    # Imported here, not at module top: drivers import this module to register themselves.
    import cim_hil.emulator.board  # noqa: F401
    import drivers.instrument_board  # noqa: F401
    import drivers.serial_board  # noqa: F401
