"""Boards hold tiles and a link; ``open_board`` opens any of them from one URL-like string.

In the spirit of pyserial's ``serial_for_url`` and its ``protocol_handler_packages``: the URL's
scheme names the driver, and drivers are found through the ``cim_hil.boards`` entry points
(``[project.entry-points."cim_hil.boards"]`` in a package's pyproject.toml, one line per
scheme: ``myboard = "my_package.board:open_my_board"``). The core names no driver and imports
only the one the URL asks for, so ``open_board("emulator:")`` loads neither pyserial nor pyvisa.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import entry_points
from typing import Any

from cim_hil.errors import BoardError, CapabilityError, UnsafeValueError
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
        return Counters.total([tile.counters for tile in self.tiles])

    def link_traffic(self) -> dict[str, float]:
        """What crossed the board's link so far (``link_seconds`` waiting on it,
        ``link_bytes_out``, ``link_bytes_in``), without asking the board anything; empty for a
        board without a link."""
        return {}

    @property
    def can_let_time_pass(self) -> bool:
        """Whether :meth:`let_time_pass` works on this board (ask before relying on it)."""
        return False

    def let_time_pass(self, seconds: float) -> None:
        """Let ``seconds`` pass with the chip idle, as a deployed chip waits between being
        programmed and being used: its conductances relax meanwhile. On a real board it means a
        wait (the serial driver has none yet); the emulator advances its clock and moves its
        devices by its relaxation model (:mod:`cim_hil.emulator.relaxation`). A board that
        cannot is a ``CapabilityError``."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf:
            raise UnsafeValueError(f"a time to let pass must be a finite number of seconds >= 0, got {seconds!r}; "
                                   "nothing changed")
        self._let_time_pass(float(seconds))

    def _let_time_pass(self, seconds: float) -> None:
        """A board's own wait; one whose driver has none refuses."""
        raise CapabilityError(f"the board at {self.url} cannot let time pass: its driver has no wait (the "
                              "emulator's models conductance relaxation)")

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
ENTRY_POINT_GROUP = "cim_hil.boards"

# A VISA resource name (TCPIP0::host::5025::SOCKET, GPIB0::12::INSTR, USB0::..., ASRL1::INSTR).
_VISA_RESOURCE = re.compile(r"(TCPIP|GPIB|USB|ASRL|PXI|VXI)\d*::", re.IGNORECASE)
# A serial port by its device path (/dev/ttyUSB0) or its Windows name (COM3).
_SERIAL_PORT = re.compile(r"/|COM\d+$", re.IGNORECASE)
_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def scheme_of(url: str) -> str:
    """The scheme that names ``url``'s driver.

    A URL's scheme is the text before its first colon, exactly as written (``emulator:``,
    ``serial:<pyserial URL>``, ``socket://host:port``, ``visa:<resource>``). Two bare forms
    have none and are given one: a VISA resource name (``TCPIP0::...``, ``GPIB0::...``) is
    ``visa``, and a serial port path (``/dev/ttyUSB0``, ``COM3``) is ``serial``.
    """
    if _VISA_RESOURCE.match(url):
        return "visa"
    if _SERIAL_PORT.match(url):
        return "serial"
    found = _URI_SCHEME.match(url)
    if found is None:
        raise BoardError(f"{url!r} is not a board URL: give a scheme (emulator:, serial:, socket://, visa:), "
                         "a serial port path or a VISA resource name")
    return found.group(1)


def known_schemes() -> list[str]:
    """The schemes the installed packages offer drivers for."""
    return sorted({point.name for point in entry_points(group=ENTRY_POINT_GROUP)})


def open_board(url: str = "emulator:", config: Any = None) -> Board:
    """Open a board from a URL-like string, with the driver its exact scheme names (:func:`scheme_of`).

    ``emulator:`` (optionally ``emulator:?tiles=8&rows=128&cols=128&seed=3`` or
    ``emulator:path/to/config.toml``) opens the cycle-accurate emulator of the reference SoC;
    ``config`` may be an :class:`~cim_hil.config.EmulatorConfig` to start from. What ``config``
    is for another scheme is that driver's to say (a ``LinkConfig`` for a serial board).
    """
    return _opener(url, scheme_of(url))(url, config)


def _opener(url: str, scheme: str) -> Opener:
    targets = {point.value: point for point in entry_points(group=ENTRY_POINT_GROUP, name=scheme)}
    if not targets:
        known = ", ".join(known_schemes()) or "none (is cim-hil installed? pip install -e .)"
        raise BoardError(f"no driver for board URL {url!r} (scheme {scheme!r}); known schemes: {known}")
    if len(targets) > 1:
        raise BoardError(f"board URL scheme {scheme!r} is claimed by several drivers: {', '.join(sorted(targets))}")
    (point,) = targets.values()
    try:
        return point.load()
    except ImportError as error:
        raise BoardError(f"the driver for {scheme!r} ({point.value}) cannot be imported: {error}") from None
