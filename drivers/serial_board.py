"""A CIM board on a serial line: every Tile operation as firmware-protocol requests.

``open_board("/dev/ttyUSB0")``, ``open_board("socket://127.0.0.1:7000")`` or
``open_board("serial:<any pyserial URL>")`` opens the port, resynchronises, says HELLO, refuses
a board that speaks another protocol version, and builds one :class:`SerialTile` per tile from
the board's INFO. ``config`` may be a :class:`~cim_hil.config.LinkConfig` (baud rate, timeout,
retries).

Conversions mirror the board's converters exactly (SPEC.md §4.2-4.3): inputs go out as the DAC
codes of the emulator's own DAC (``cim_hil.codes.input_codes``), outputs come back
as ADC codes times the LSB the board reported, so a virtual board gives bit-for-bit the
in-process emulator's numbers.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import serial
import torch

from cim_hil.board import Board
from cim_hil.codes import input_codes
from cim_hil.config import LinkConfig
from cim_hil.errors import BoardError, ConfigError, UnsafeValueError
from cim_hil.group import TileGroup
from cim_hil.layer_products import Convolution, LayerCut, products_of_blocks
from cim_hil.tile import Counters, ProgramResult, Tile, Window
from drivers.board_info import spec_from_info
from drivers.link import BoardRefused, Link
from firmware_protocol import messages as m
from firmware_protocol.codes import CodeFormat
from firmware_protocol.framing import MAX_PAYLOAD, VERSION

MAX_BATCH = 0xFFFF  # FORWARD's and LAYER_FORWARD's batch field is u16; longer batches go as several requests


class SerialTile(Tile):
    """One tile of a board reached through ``link``; its numbers come from the board."""

    def __init__(self, link: Link, index: int, info: m.Info) -> None:
        self.link, self.index, self.board_info = link, index, info
        self.spec = spec_from_info(info)
        self._input_dtype = np.int8 if info.input_bits <= 8 else np.int16
        # What one output code stands for, forward and transposed: INFO's, until SET_ADC_RANGE.
        self.lsbs_ua = [info.forward_lsb_ua, info.backward_lsb_ua]
        # Whether the firmware reads windows (SPEC.md §8.5); without, a window goes as padding.
        self.windows = bool(info.capabilities & m.WINDOWS_BIT)

    @property
    def counters(self) -> Counters:
        """The board's counters for this tile (one READ_COUNTERS round trip)."""
        reply = self.link.request(m.ReadCounters(self.index), m.CountersReply)
        return Counters(
            clock_hz=float(self.board_info.clock_hz), cycles=reply.cycles, products=reply.products,
            transpose_products=reply.transpose_products, pulses=reply.pulses, device_reads=reply.device_reads,
            verify_trials=reply.verify_trials, energy_nj=reply.energy_nj,
        )

    # ---- products -------------------------------------------------------------------------
    def _products(
        self, x: torch.Tensor, transpose: bool, outputs: int, origin: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """FORWARDs of ``x``, on the window at ``origin`` (row, col) if given (SPEC.md §8.5)."""
        codes = input_codes(x.to(torch.float32), self.spec.input_bits).numpy().astype(self._input_dtype)
        lsb = self.lsbs_ua[transpose]
        # Both the request and its reply must fit MAX_MESSAGE (SPEC.md §2).
        out_bytes = 1 if self.spec.output_bits <= 8 else 2
        head = 8 if origin is None else 12
        per_request = max(1, min(MAX_BATCH, (m.MAX_MESSAGE - head) // (codes.shape[1] * codes.itemsize),
                                 (m.MAX_MESSAGE - 6) // (outputs * out_bytes)))
        parts = []
        for start in range(0, max(len(codes), 1), per_request):
            request = m.Forward(self.index, transpose, codes[start : start + per_request], outputs, origin)
            reply = self.link.request(request, m.Products)
            parts.append(torch.from_numpy(reply.codes.astype(np.float32)) * lsb)
        return torch.cat(parts)

    def _forward(self, x: torch.Tensor, outputs: int) -> torch.Tensor:
        return self._products(x.cpu(), False, outputs)

    def _backward(self, d: torch.Tensor, outputs: int) -> torch.Tensor:
        return self._products(d.cpu(), True, outputs)

    def _window_product(self, x: torch.Tensor, outputs: int, origin: tuple[int, int], transpose: bool) -> torch.Tensor:
        if not self.windows:
            return super()._window_product(x, outputs, origin, transpose)
        return self._products(x.cpu(), transpose, outputs, origin)

    def _set_adc_range(self, full_scale_ua: float | None, transpose: bool) -> float:
        """One SET_ADC_RANGE; the LSB the board answers converts this tile's codes from then on."""
        request = m.SetAdcRange(self.index, int(transpose), 0.0 if full_scale_ua is None else full_scale_ua)
        reply = self.link.request(request, m.AdcRange)
        if (reply.tile, reply.direction) != (self.index, int(transpose)) or not 0 < reply.lsb_ua < math.inf:
            raise BoardError(f"board on {self.link.name} answered SET_ADC_RANGE of tile {self.index} with tile "
                             f"{reply.tile}, direction {reply.direction}, LSB {reply.lsb_ua} uA")
        self.lsbs_ua[transpose] = reply.lsb_ua
        return reply.lsb_ua

    # ---- conductances ---------------------------------------------------------------------
    def _read(self, array: int, window: Window) -> torch.Tensor:
        reply = self.link.request(m.ReadMap(self.index, array, *window), m.Map)
        return torch.from_numpy(reply.codes.astype(np.float32)) * self.board_info.read_lsb_us

    def _read_conductances(self, window: Window) -> torch.Tensor:
        return self._read(0, window)

    def _read_reference(self) -> torch.Tensor:
        return self._read(1, (0, self.spec.rows, 0, self.spec.cols))

    def _apply_pulses(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.cpu()
        where = counts.nonzero()
        sparse_bytes = 6 * len(where)  # (u16 row, u16 col, i16 pulses) per device
        if sparse_bytes < 2 * counts.numel():
            rows, cols = where[:, 0].numpy(), where[:, 1].numpy()
            request = m.PulsesSparse(self.index, rows.astype(np.uint16), cols.astype(np.uint16),
                                     counts[where[:, 0], where[:, 1]].numpy().astype(np.int16))
            reply = self.link.request(request, m.PulsesApplied)
            applied = torch.zeros_like(counts)
            applied[where[:, 0], where[:, 1]] = torch.from_numpy(reply.values.astype(np.int64)).flatten()
            return applied
        reply = self.link.request(m.PulsesDense(self.index, 0, counts.numpy().astype(np.int16)), m.PulsesApplied)
        return torch.from_numpy(reply.values.astype(np.int64))

    def _program_verify(
        self, targets: torch.Tensor, mask: torch.Tensor, tolerance_us: float, max_trials: int, reference: bool
    ) -> ProgramResult:
        if max_trials > 0xFFFF:
            raise UnsafeValueError(f"max_trials {max_trials} does not fit the protocol's u16 field; nothing was programmed")
        wire_targets = torch.where(mask.cpu(), targets.cpu(), torch.tensor(float("nan"))).numpy().astype(np.float32)
        request = m.Program(self.index, int(reference), max_trials, tolerance_us, wire_targets)
        reply = self.link.request(request, m.ProgramReport)
        return ProgramResult(
            reached_us=torch.from_numpy(reply.reached_us.astype(np.float32)),
            trials=torch.from_numpy(reply.trials.astype(np.int64)),
            failed=torch.from_numpy(reply.failed.astype(bool)),
            tolerance_us=tolerance_us,
        )


class SerialGroup(TileGroup):
    """Tiles of one serial board run as one: a whole layer, and named devices of many tiles,
    in one request each (SPEC.md §8)."""

    tiles: tuple[SerialTile, ...]

    @property
    def reads_windows(self) -> bool:
        """Whether the group's tiles share one link to a board that reads windows."""
        first = self.tiles[0]
        return all(tile.link is first.link and tile.windows for tile in self.tiles)

    def _products_on(
        self, x: torch.Tensor, outputs: list[int], transpose: bool, in_range: bool, windows: list[Window] | None,
    ) -> torch.Tensor:
        """Blocks on windows go as FORWARDs that name their windows, where the board reads
        them (SPEC.md §8.5): only each window's inputs travel, only its outputs come back."""
        if windows is None or not self.reads_windows:
            return super()._products_on(x, outputs, transpose, in_range, windows)
        out = torch.zeros(len(self), x.shape[1], max(outputs))
        for index, (tile, inputs, width, (r0, r1, c0, c1)) in enumerate(zip(self.tiles, x, outputs, windows)):
            driven = (c1 - c0) if transpose else (r1 - r0)
            out[index, :, :width] = tile._products(inputs[:, :driven], transpose, width, (r0, c0))
        return out

    def _layer_products(
        self, cut: LayerCut, codes: torch.Tensor, convolution: Convolution | None,
        origins: list[tuple[int, int]] | None,
    ) -> torch.Tensor:
        """One LAYER_FORWARD: each sample (or image) sent once, as compact codes; the board cuts
        the patches and sums the row blocks' codes, so one set of outputs comes back. Blocks
        packed beside others name their origins, where the board reads windows."""
        tiles = self.tiles
        first = tiles[0]
        if (any(tile.link is not first.link or tile.lsbs_ua[0] != first.lsbs_ua[0] for tile in tiles)
                or (origins is not None and not self.reads_windows)):  # (the board sums codes of one LSB only)
            return products_of_blocks(self, cut, codes, convolution, origins)
        spec, lsb = first.spec, first.lsbs_ua[0]
        in_format = CodeFormat.I8_ZERO_RUNS if spec.input_bits <= 8 else CodeFormat.I16
        out_format = CodeFormat.I8_ESCAPED  # sums of the row blocks may pass one byte; most do not
        geometry = None
        if convolution is not None:
            channels_last = codes.is_contiguous(memory_format=torch.channels_last) and not codes.is_contiguous()
            geometry = m.Geometry(int(channels_last), convolution.channels, convolution.height, convolution.width,
                                  convolution.kernel, convolution.stride, convolution.padding, convolution.dilation)
            codes = codes.permute(0, 2, 3, 1) if channels_last else codes
        wire = codes.reshape(len(codes), -1).numpy().astype(np.int16)
        tile_indices = np.array([tile.index for tile in tiles], dtype=np.uint16)
        corners = np.array(origins, dtype=np.uint16) if origins is not None else None
        parts = []
        for start in range(0, max(len(wire), 1), MAX_BATCH):
            request = m.LayerForward(int(in_format), int(out_format), cut.row_blocks, cut.col_blocks, cut.in_features,
                                     cut.out_features, tile_indices, geometry, wire[start : start + MAX_BATCH], corners)
            rows = len(request.codes) * (math.prod(convolution.out_size) if convolution is not None else 1)
            reply = first.link.request(request, m.LayerProducts, reply_size=8 + rows * cut.out_features)
            parts.append(torch.from_numpy(reply.codes.astype(np.float32)) * lsb)
        return torch.cat(parts)

    def _program_places(
        self, devices: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor, tolerance_us: float,
        max_trials: int,
    ) -> ProgramResult:
        """One PROGRAM_DEVICES for the named devices of every tile (several, each of whole
        arrays, past what one message holds): targets as level indices where each is exactly
        a level's conductance, a compact report back."""
        tiles = self.tiles
        first = tiles[0]
        # A budget past what DEVICES_REPORT reports, or tiles on several links, go as whole-tile PROGRAMs.
        if max_trials > m.MAX_REPORTED_TRIALS or any(tile.link is not first.link for tile in tiles):
            return super()._program_places(devices, targets, reference, tolerance_us, max_trials)
        spec = first.spec
        per_tile = spec.rows * spec.cols
        board_tiles = torch.tensor([tile.index for tile in tiles])[devices.div(per_tile, rounding_mode="floor")]
        places, arrays = devices % per_tile, reference.to(torch.int64)
        # Sorted by (tile, array, place): each tile's array is one group of the request.
        order = ((board_tiles * 2 + arrays) * per_tile + places).argsort()
        chosen = targets.cpu().index_select(0, order)
        levels = chosen.sub(spec.g_min_us).div_(spec.level_spacing_us).round_().clamp_(0, spec.levels - 1).to(torch.int64)
        if torch.equal(spec.level_conductance(levels), chosen):
            wire_targets = levels.numpy().astype(np.uint8 if spec.levels <= 256 else np.uint16)
        else:
            wire_targets = chosen.numpy().astype(np.float32)
        sorted_tiles, sorted_arrays, sorted_places = (values[order] for values in (board_tiles, arrays, places))
        reached, trials, failed = (torch.empty(len(devices), dtype=dtype) for dtype in (torch.float32, torch.int64, torch.bool))
        # Half a message (SPEC.md §2) of places and targets per request: the report (3 bytes and a
        # bit a device) and the groups' headers fit the same.
        per_request = (m.MAX_MESSAGE // 2) // (2 + wire_targets.itemsize)
        for start, end in _parts_of_whole_arrays(sorted_tiles * 2 + sorted_arrays, per_request):
            request = m.ProgramDevices(max_trials, tolerance_us, sorted_tiles[start:end].numpy().astype(np.uint16),
                                       sorted_arrays[start:end].numpy().astype(np.uint8),
                                       sorted_places[start:end].numpy().astype(np.uint16), wire_targets[start:end])
            count = end - start
            reply = first.link.request(request, m.DevicesReport, reply_size=4 + 3 * count + (count + 7) // 8)
            if len(reply.reached_codes) != count:
                raise BoardError(f"board on {first.link.name} reported {len(reply.reached_codes)} devices of {count}")
            chosen_places = order[start:end]
            reached[chosen_places] = torch.from_numpy(reply.reached_codes.astype(np.float32)) * first.board_info.read_lsb_us
            trials[chosen_places] = torch.from_numpy(reply.trials.astype(np.int64))
            failed[chosen_places] = torch.from_numpy(reply.failed)
        return ProgramResult(reached, trials, failed, tolerance_us)


def _parts_of_whole_arrays(arrays: torch.Tensor, limit: int) -> list[tuple[int, int]]:
    """(start, end) parts of devices sorted by ``arrays`` (tile x 2 + array), each at most
    ``limit`` devices unless one array has more, never splitting an array: each array's
    devices are then programmed in one request, drawing its noise as it would in one call."""
    if len(arrays) <= limit:
        return [(0, len(arrays))]
    starts = [0, *(torch.nonzero(arrays[1:] != arrays[:-1]).flatten() + 1).tolist(), len(arrays)]
    parts, begin = [], 0
    for at, following in zip(starts[1:], starts[2:] + [None]):
        if following is None or following - begin > limit:
            parts.append((begin, at))
            begin = at
    return parts


class SerialBoard(Board):
    """The tiles of one board and the link they share; closing the board closes the port."""

    def __init__(self, tiles: list[SerialTile], url: str, link: Link, info: m.Info) -> None:
        firmware = f"{info.firmware_major}.{info.firmware_minor}.{info.firmware_patch}"
        super().__init__(tiles, url, {"backend": "serial", "firmware": firmware, "protocol_version": info.protocol_version,
                                      "clock_hz": info.clock_hz, "baudrate": link.config.baudrate,
                                      "windows": tiles[0].windows},
                         group_type=SerialGroup)
        self.link = link

    @property
    def counters(self) -> Counters:
        total = super().counters
        total.link_bytes_out = self.link.stats.bytes_out
        total.link_bytes_in = self.link.stats.bytes_in
        return total

    def link_traffic(self) -> dict[str, float]:
        stats = self.link.stats
        return {"link_seconds": stats.seconds, "link_bytes_out": stats.bytes_out, "link_bytes_in": stats.bytes_in}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "link": self.link.stats.as_dict()}

    def close(self) -> None:
        self.link.close()


def _check_socket_url(url: str) -> None:
    """A ``socket://host:port`` URL names its mistake here, not in pyserial's words."""
    if not url.startswith("socket://"):
        return
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        digits = parts.netloc.rpartition(":")[2]
        raise ConfigError(f"{url}: port {digits} is outside 1..65535" if digits.isdigit()
                          else f"{url}: the port must be a number, got {digits!r}") from None
    if port is None:
        raise ConfigError(f"{url} needs a port: socket://HOST:PORT")
    if not parts.hostname:
        raise ConfigError(f"{url} needs a host: socket://HOST:PORT")
    if port == 0:
        raise ConfigError(f"{url}: port 0 is outside 1..65535")


def open_serial_board(url: str, config: LinkConfig | None = None) -> SerialBoard:
    """The opener of the ``serial`` scheme (a bare port path has it) and of pyserial's own URL
    schemes (``socket://``, ``rfc2217://``, ``loop://``): the rest goes to ``serial_for_url``."""
    if config is None:
        config = LinkConfig()
    elif not isinstance(config, LinkConfig):
        raise ConfigError(f"a serial board takes a LinkConfig, got {type(config).__name__}")
    port_url = url.removeprefix("serial:")
    _check_socket_url(port_url)
    try:
        port = serial.serial_for_url(
            port_url, baudrate=config.baudrate, timeout=Link.POLL_S, write_timeout=max(1.0, config.response_timeout_s)
        )
    except (serial.SerialException, ValueError, OSError) as error:
        raise BoardError(f"cannot open serial port {port_url}: {error}") from None
    link = Link(port, port_url, config)
    try:
        link.resynchronise()
        info = link.request(m.Hello(VERSION), m.Info)
        if info.protocol_version != VERSION:
            raise BoardError(f"board on {port_url} speaks protocol version {info.protocol_version}; this host speaks {VERSION}")
    except BoardRefused as refusal:
        link.close()
        if refusal.code == m.ErrorCode.UNSUPPORTED_VERSION:
            raise BoardError(f"{refusal}; this host speaks protocol version {VERSION}: update the firmware or cim-hil") from None
        raise
    except BaseException:
        link.close()
        raise
    link.max_payload = min(MAX_PAYLOAD, info.max_payload)
    return SerialBoard([SerialTile(link, index, info) for index in range(info.tiles)], url, link, info)

