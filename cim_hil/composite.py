"""One board made of several: ``composite:URL1|URL2|...``.

A composite board is a ``Board`` like any other: its tiles are its members' tiles in the order
the URLs name them, so the trainer, the planner and calibration run on it unchanged: a
reference SoC on a serial cable plus emulated tiles
(``composite:socket://127.0.0.1:7000|emulator:?tiles=14&first_tile=4``), or several SoCs on
several cables. A group of tiles of several members splits into one group per member: each
member runs its part with its own batched calls (the emulator's at once), and the members work
at the same time, one thread each (a serial member waits on its line while another computes),
with the numbers each tile gives alone. Counters and link figures are kept per member (read
from all members at once) and summed. A member that fails raises an error naming it ("member k
of composite board ... (its URL)"); the caller's host state is as that error leaves it (the
trainer changes nothing until every device of a step is programmed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from cim_hil.board import Board, open_board, scheme_of
from cim_hil.config import LinkConfig
from cim_hil.errors import BoardError, CimHilError
from cim_hil.group import TileGroup, cut_to_windows, padded_to_windows
from cim_hil.tile import Counters, ProgramResult, Tile, TileSpec, Window

SEPARATOR = "|"
T = TypeVar("T")


class CompositeBoard(Board):
    """The tiles of ``members`` (boards sharing one tile spec) as one board."""

    def __init__(self, members: Sequence[Board], url: str) -> None:
        if not members:
            raise BoardError("a composite board needs at least one member board")
        spec = members[0][0].spec
        for index, member in enumerate(members[1:], start=1):
            other = member[0].spec
            if not _same_spec(spec, other):
                raise BoardError(f"member {index} ({member.url}) has tiles of {other.rows}x{other.cols}, "
                                 f"{other.levels} levels in [{other.g_min_us:g}, {other.g_max_us:g}] uS, capabilities "
                                 f"{', '.join(sorted(other.capabilities))}; member 0 ({members[0].url}) of {spec.rows}x"
                                 f"{spec.cols}, {spec.levels} levels in [{spec.g_min_us:g}, {spec.g_max_us:g}] uS, "
                                 f"capabilities {', '.join(sorted(spec.capabilities))}: a composite board's tiles "
                                 "must share one spec")
        # A spec read from a board's INFO holds float32 values, the emulator's float64 ones: the
        # same spec, so every member's tiles take member 0's, and groups of them run as one.
        for member in members[1:]:
            for tile in member.tiles:
                tile.spec = spec
        self.members = list(members)
        super().__init__([tile for member in self.members for tile in member.tiles], url, {"backend": "composite"},
                         group_type=CompositeGroup)
        self.member_of = {id(tile): index for index, member in enumerate(self.members) for tile in member.tiles}
        self._workers = ThreadPoolExecutor(max_workers=len(self.members), thread_name_prefix="composite-member")

    def group(self, tiles: Sequence[Tile]) -> TileGroup:
        """Tiles of one member run as that member's group (the emulator's at once); tiles of
        several members as a :class:`CompositeGroup`, one group per member."""
        members = {self.member_of.get(id(tile)) for tile in tiles}
        if len(members) == 1 and None not in members:
            return self.members[members.pop()].group(tiles)
        return super().group(tiles)

    def each(self, calls: Sequence[tuple[int, Callable[[], T]]]) -> list[T]:
        """Run ``(member index, call)`` pairs, members at the same time; a member's error names it."""
        if len(calls) == 1:
            return [self._named(*calls[0])]
        futures = [self._workers.submit(self._named, index, call) for index, call in calls]
        return [future.result() for future in futures]

    def _named(self, index: int, call: Callable[[], T]) -> T:
        try:
            return call()
        except CimHilError as error:
            raise type(error)(f"member {index} of composite board {self.url} ({self.members[index].url}): "
                              f"{error}") from None

    # ---- what it did ----------------------------------------------------------------------
    def member_counters(self) -> list[Counters]:
        """Each member's counters (link figures included where a member has a link)."""
        return self.each([(index, lambda member=member: member.counters) for index, member in enumerate(self.members)])

    @property
    def counters(self) -> Counters:
        return Counters.total(self.member_counters())

    def link_traffic(self) -> dict[str, float]:
        """The members' links summed (members wait at the same time, so ``link_seconds`` can
        exceed the wall time); empty when no member has a link."""
        total: dict[str, float] = {}
        for member in self.members:
            for name, value in member.link_traffic().items():
                total[name] = total.get(name, 0) + value
        return total

    def info(self) -> dict[str, Any]:
        return {**super().info(), "members": [member.info() for member in self.members]}

    # ---- time ---------------------------------------------------------------------------
    @property
    def can_let_time_pass(self) -> bool:
        return all(member.can_let_time_pass for member in self.members)

    def _let_time_pass(self, seconds: float) -> None:
        """Every member waits, at the same time; when one cannot, none is asked to."""
        for index, member in enumerate(self.members):
            if not member.can_let_time_pass:
                self._named(index, lambda member=member: member.let_time_pass(seconds))
        self.each([(index, lambda member=member: member.let_time_pass(seconds))
                   for index, member in enumerate(self.members)])

    # ---- emulated state, for checkpoints --------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """The members' emulated states; None when any member is real hardware, whose devices
        keep their own state (a resume then writes every device again from the host)."""
        states = [member.state_dict() for member in self.members]
        return None if any(state is None for state in states) else {"url": self.url, "members": states}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if len(state.get("members", ())) != len(self.members):
            raise BoardError(f"checkpoint holds a board of {len(state.get('members', ()))} members, "
                             f"{self.url} has {len(self.members)}")
        for member, member_state in zip(self.members, state["members"]):
            member.load_state_dict(member_state)

    def close(self) -> None:
        self._workers.shutdown(wait=True)
        for member in self.members:
            member.close()


class CompositeGroup(TileGroup):
    """Tiles of several members: each member runs its entries as its own group (the emulator's
    at once), members at the same time, and an error names the member it came from."""

    def __init__(self, tiles: Sequence[Tile], board: Board | None = None) -> None:
        super().__init__(tiles, board)
        assert isinstance(board, CompositeBoard)
        self.composite = board
        owners = [board.member_of[id(tile)] for tile in self.tiles]
        self.parts = []  # (member, the entries it runs, its group of their tiles)
        for member in sorted(set(owners)):
            entries = [index for index, owner in enumerate(owners) if owner == member]
            group = board.members[member].group([self.tiles[index] for index in entries])
            self.parts.append((member, torch.tensor(entries), group))

    def _gathered(self, part: Callable[[torch.Tensor, TileGroup], Callable[[], torch.Tensor]], x: torch.Tensor,
                  outputs: list[int]) -> torch.Tensor:
        """Every member's ``part`` (its entries, its group) at once, the results put back in the
        group's entry order."""
        results = self.composite.each([(member, part(entries, group)) for member, entries, group in self.parts])
        out = torch.zeros(len(self), x.shape[1], max(outputs))
        for (_, entries, _), result in zip(self.parts, results):
            out[entries, :, : result.shape[2]] = result.cpu()
        return out

    def _products(self, x: torch.Tensor, outputs: list[int], transpose: bool, in_range: bool) -> torch.Tensor:
        def part(entries: torch.Tensor, group: TileGroup) -> Callable[[], torch.Tensor]:
            widths = [outputs[index] for index in entries.tolist()]
            return lambda: group._products(x[entries], widths, transpose, in_range)

        return self._gathered(part, x, outputs)

    def _products_on(
        self, x: torch.Tensor, outputs: list[int], transpose: bool, in_range: bool, windows: list[Window] | None,
    ) -> torch.Tensor:
        """Blocks on windows: a member that reads windows (a serial board whose firmware does)
        is handed its entries' windows; every other member its entries padded as the whole
        group pads them, so its numbers are those it gives alone."""
        if windows is None or not any(group.reads_windows for _, _, group in self.parts):
            return super()._products_on(x, outputs, transpose, in_range, windows)
        padded, wide, firsts = padded_to_windows(x, outputs, transpose, windows)

        def part(entries: torch.Tensor, group: TileGroup) -> Callable[[], torch.Tensor]:
            chosen = entries.tolist()
            widths = [outputs[index] for index in chosen]
            if group.reads_windows:
                return lambda: group._products_on(x[entries], widths, transpose, in_range, [windows[i] for i in chosen])
            return lambda: cut_to_windows(group._products(padded[entries], [wide[i] for i in chosen], transpose, in_range),
                                          widths, [firsts[i] for i in chosen])

        return self._gathered(part, x, outputs)

    def _program_places(
        self, places: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor, tolerance_us: float,
        max_trials: int,
    ) -> ProgramResult:
        per_tile = self.spec.rows * self.spec.cols
        tile_of = places.div(per_tile, rounding_mode="floor")
        local = torch.empty(len(self), dtype=torch.int64)  # each entry's position in its member's group
        for _, entries, _ in self.parts:
            local[entries] = torch.arange(len(entries))
        calls, chosen = [], []
        for member, entries, group in self.parts:
            mine = torch.isin(tile_of, entries).nonzero().squeeze(1)
            if not mine.numel():
                continue
            member_places = local[tile_of[mine]] * per_tile + places[mine] % per_tile
            calls.append((member, lambda g=group, p=member_places, m=mine: g._program_places(
                p, targets[m], reference[m], tolerance_us, max_trials)))
            chosen.append(mine)
        reached = torch.full(places.shape, float("nan"))
        trials = torch.zeros(places.shape, dtype=torch.int64)
        failed = torch.zeros(places.shape, dtype=torch.bool)
        for mine, result in zip(chosen, self.composite.each(calls)):
            reached[mine], trials[mine], failed[mine] = result.reached_us.cpu(), result.trials.cpu(), result.failed.cpu()
        return ProgramResult(reached, trials, failed, tolerance_us)


def _same_spec(a: TileSpec, b: TileSpec) -> bool:
    """Equal, floats compared as the float32 a board's INFO carries them."""
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, float):
            if not math.isclose(value, other, rel_tol=1e-6):
                return False
        elif value != other:
            return False
    return True


def open_composite(url: str, config: Any = None) -> CompositeBoard:
    """``composite:URL1|URL2|...``: each member opened with ``open_board`` from its own URL;
    ``config``, a ``LinkConfig`` (line rate, patience), goes to every member but emulators,
    which their URLs configure. If one cannot be opened, those already open are closed and the
    error names it."""
    if config is not None and not isinstance(config, LinkConfig):
        raise BoardError(f"a composite board takes a LinkConfig for its members on a link, not "
                         f"{type(config).__name__}: configure emulated members through their URLs")
    urls = [part for part in url.removeprefix("composite:").split(SEPARATOR)]
    if not urls or any(not part for part in urls):
        raise BoardError(f"composite board URL {url!r} must list member URLs separated by {SEPARATOR!r}, "
                         "e.g. composite:socket://127.0.0.1:7000|emulator:?tiles=14&first_tile=4")
    members: list[Board] = []
    try:
        for index, member_url in enumerate(urls):
            if member_url.startswith("composite:"):
                raise BoardError("a composite board's members cannot be composite boards themselves")
            try:
                members.append(open_board(member_url, None if scheme_of(member_url) == "emulator" else config))
            except CimHilError as error:
                raise type(error)(f"member {index} of composite board {url} ({member_url}): {error}") from None
        return CompositeBoard(members, url)
    except BaseException:
        for member in members:
            member.close()
        raise
