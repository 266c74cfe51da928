"""The board's side of the firmware protocol, executing on emulated tiles.

:class:`BoardFirmware` is what a real board's firmware does with the bytes it receives
(firmware_protocol/SPEC.md): frames are decoded, fragments acknowledged and reassembled, the
whole request runs **once** on the tiles, and the answer is kept so a repeated sequence number
is answered again without running anything twice. It knows nothing about lines or timing; the
virtual board puts it behind a pseudo-terminal or a socket.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Callable

import numpy as np
import torch

from cim_hil.board import Board
from cim_hil.codes import top_code
from cim_hil.emulator.tile import EmulatedTile
from cim_hil.errors import CapabilityError, ConfigError, ShapeError, UnsafeValueError
from cim_hil.layer_products import Convolution, LayerCut, layer_products
from cim_hil.group import TileGroup
from cim_hil.tile import Counters
from drivers.board_info import capability_bits, info_fields
from firmware_protocol import messages as m
from firmware_protocol.codes import CodeFormat
from firmware_protocol.errors import ProtocolError, UnknownMessageError
from firmware_protocol.framing import FLAG_MORE, MAX_PAYLOAD, VERSION, Frame, FrameDecoder, encode_frame

FIRMWARE_VERSION = (0, 3, 0)
WIDEST_CODE_BITS = 16  # the protocol carries codes in at most 16 bits (SPEC.md §4.2-4.3)


class Refusal(Exception):
    """A request the board answers with ERROR; nothing on the board changed."""

    def __init__(self, code: m.ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code


class BoardFirmware:
    """Bytes in, answer bytes out, for a board built by ``make_board`` (called again on RESET 1)."""

    def __init__(self, make_board: Callable[[], Board], protocol_version: int = VERSION, windows: bool = True) -> None:
        self.make_board = make_board
        self.board = make_board()
        self.protocol_version = protocol_version
        # Whether it reads windows (SPEC.md §8.5); without, it is a v3 board from before them.
        self.windows = windows
        self._check_fits_protocol(self.board[0])
        self.executed: Tally[str] = Tally()  # requests run, by message name: what tests count
        self._decoder = FrameDecoder(speaks=None)  # a foreign version is answered, not dropped
        self._reassembler = m.Reassembler()
        self._last: tuple[int, int, bytes] | None = None  # (seq, type, encoded answer) kept for repeats
        self._pieces: list[bytes] = []  # every piece of the last reply that took more than one frame
        self._pending_type = 0
        self._groups: dict[tuple, TileGroup] = {}

    @staticmethod
    def _check_fits_protocol(tile: EmulatedTile) -> None:
        spec = tile.spec
        if max(spec.input_bits, spec.output_bits) > WIDEST_CODE_BITS:
            raise ConfigError(
                f"the firmware protocol carries at most {WIDEST_CODE_BITS}-bit codes; this emulator has "
                f"input_bits={spec.input_bits}, output_bits={spec.output_bits}"
            )
        if max(spec.rows, spec.cols) > 0xFFFF or spec.max_pulses_per_call > 0x7FFF:
            raise ConfigError("tile size or max_pulses_per_call too large for the firmware protocol's 16-bit fields")

    # ---- sessions -----------------------------------------------------------------------------
    def new_session(self) -> None:
        """Forget everything the last host left half-done: a partial frame or message, a reply
        not fetched yet, and the kept answer (a new host's seq could repeat the old host's)."""
        self._decoder = FrameDecoder(speaks=None)
        self._reassembler = m.Reassembler()
        self._last = None
        self._pending, self._pending_type = [], 0

    @staticmethod
    def busy_answer(frame: Frame) -> bytes | None:
        """The answer to a request from a host that must wait: ERROR BUSY with its seq."""
        if frame.type & 0x80:
            return None
        text = "the board is serving another host; retry when it has disconnected"
        return encode_frame(BoardFirmware._error_frame(frame, m.ErrorCode.BUSY, text))

    # ---- frames -------------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[bytes]:
        """Feed bytes from the line; returns the encoded answers to send, in order."""
        return [self.answer(frame) for frame in self._decoder.feed(data)]

    def answer(self, frame: Frame) -> bytes:
        """The encoded answer to one frame, by the state machine of SPEC.md §2-3."""
        if frame.version != self.protocol_version:
            # Written in the frame's own version, whose header and ERROR are those of every
            # version, so any host can read it; nothing else changes and nothing is kept.
            refusal = self._error_frame(frame, m.ErrorCode.UNSUPPORTED_VERSION,
                                        f"this board speaks protocol version {self.protocol_version}, "
                                        f"not {frame.version}")
            return encode_frame(Frame(refusal.type, refusal.seq, refusal.payload, 0, frame.version))
        if self._last is not None and self._last[:2] == (frame.seq, frame.type):
            return self._last[2]  # repeated seq: the kept answer, nothing runs again
        reply = self._handle(frame)
        encoded = encode_frame(Frame(reply.type, reply.seq, reply.payload, reply.flags, self.protocol_version))
        self._last = (frame.seq, frame.type, encoded)
        return encoded

    def _handle(self, frame: Frame) -> Frame:
        if frame.type == m.Next.TYPE:
            self._reassembler.reset()  # a request's fragments end at any other frame (SPEC.md §2)
            if frame.more:
                return self._error_frame(frame, m.ErrorCode.BAD_LENGTH, "NEXT is one frame without MORE")
            return self._next_piece(frame)
        self._pieces = []  # any other frame abandons a half-fetched reply
        if not m.is_request(frame.type):
            self._reassembler.reset()
            return self._error_frame(frame, m.ErrorCode.UNKNOWN_MESSAGE, f"type {frame.type:#04x} is not a request")
        if self._reassembler.assembling not in (None, frame.type):
            self._reassembler.reset()  # a new message discards the partial one (SPEC.md §2)
        try:
            message = self._reassembler.add(frame)
        except UnknownMessageError as error:
            return self._error_frame(frame, m.ErrorCode.UNKNOWN_MESSAGE, str(error))
        except ProtocolError as error:
            return self._error_frame(frame, m.ErrorCode.BAD_LENGTH, str(error))
        if message is None:
            return Frame(m.Ack.TYPE, frame.seq, m.Ack(frame.type).encode())
        try:
            reply = self._execute(message)
        except Refusal as refusal:
            return self._error_frame(frame, refusal.code, str(refusal))
        pieces = m.payload_pieces(reply.encode(), MAX_PAYLOAD)
        self._pieces, self._pending_type = pieces if len(pieces) > 1 else [], reply.TYPE
        return Frame(reply.TYPE, frame.seq, pieces[0], FLAG_MORE if len(pieces) > 1 else 0)

    def _next_piece(self, frame: Frame) -> Frame:
        """Piece n of the pending reply, as often as it is asked for: nothing runs again."""
        try:
            piece = m.Next.decode(frame.payload).piece
        except ProtocolError as error:
            return self._error_frame(frame, m.ErrorCode.BAD_LENGTH, str(error))
        if not 1 <= piece < len(self._pieces):
            pending = f"pieces 1..{len(self._pieces) - 1} are pending" if self._pieces else "no reply is pending"
            return self._error_frame(frame, m.ErrorCode.NO_PENDING_REPLY, f"no piece {piece}: {pending}")
        more = FLAG_MORE if piece < len(self._pieces) - 1 else 0
        return Frame(self._pending_type, frame.seq, self._pieces[piece], more)

    @staticmethod
    def _error_frame(frame: Frame, code: m.ErrorCode, text: str) -> Frame:
        return Frame(m.Error.TYPE, frame.seq, m.Error(int(code), frame.type, text[:900]).encode())

    # ---- requests -------------------------------------------------------------------------------
    def _execute(self, message: m.Message) -> m.Message:
        handler = getattr(self, f"_on_{type(message).__name__.lower()}", None)
        if handler is None:
            raise Refusal(m.ErrorCode.UNKNOWN_MESSAGE, f"{type(message).__name__} is not a request")
        try:
            self._require(message)
            reply = handler(message)
        except Refusal:
            raise
        except CapabilityError as error:
            raise Refusal(m.ErrorCode.UNSUPPORTED, str(error)) from None
        except (ShapeError, UnsafeValueError) as error:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, str(error)) from None
        except Exception as error:  # firmware reports its own faults and keeps serving
            raise Refusal(m.ErrorCode.INTERNAL, f"{type(error).__name__}: {error}") from None
        self.executed[type(message).__name__] += 1
        return reply

    def _require(self, message: m.Message) -> None:
        """UNSUPPORTED before OUT_OF_RANGE: what the board lacks is refused before any field is
        checked (SPEC.md §4.9)."""
        needed = {m.Forward: [m.CapabilityBit.analog_products], m.PulsesSparse: [m.CapabilityBit.pulses],
                  m.PulsesDense: [m.CapabilityBit.pulses], m.Program: [m.CapabilityBit.write_verify]}.get(type(message), [])
        if isinstance(message, m.Forward) and message.transpose:
            needed.append(m.CapabilityBit.transpose)
        if isinstance(message, m.SetAdcRange):
            needed.append(m.CapabilityBit.adc_range)
            if message.direction == 1:
                needed.append(m.CapabilityBit.transpose)
        if isinstance(message, (m.Program, m.ReadMap)) and message.array == 1:
            needed.append(m.CapabilityBit.reference)
        have = capability_bits(self.board[0].spec.capabilities)
        for capability in needed:
            if not have & capability:
                raise Refusal(m.ErrorCode.UNSUPPORTED, f"this board has no {capability.name.replace('_', ' ')}")

    def _group(self, indices) -> TileGroup:
        """The board's group of the tiles at ``indices``, kept (with what it keeps) until a reset
        builds a new board."""
        key = tuple(indices)
        if key not in self._groups:
            if len(self._groups) >= 64:  # a host that names ever new sets of tiles keeps no more than this
                self._groups.clear()
            self._groups[key] = self.board.group([self.board[index] for index in key])
        return self._groups[key]

    def _tile(self, index: int) -> EmulatedTile:
        if not 0 <= index < len(self.board):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"tile {index} does not exist; the board has {len(self.board)}")
        return self.board[index]

    def _on_hello(self, hello: m.Hello) -> m.Info:
        if hello.protocol_version != self.protocol_version:
            raise Refusal(
                m.ErrorCode.UNSUPPORTED_VERSION,
                f"this board speaks protocol version {self.protocol_version}, not {hello.protocol_version}",
            )
        tile = self.board[0]
        major, minor, patch = FIRMWARE_VERSION
        fields = info_fields(tile.spec)
        return m.Info(
            protocol_version=self.protocol_version, firmware_major=major, firmware_minor=minor,
            firmware_patch=patch, tiles=len(self.board), clock_hz=int(tile.counters.clock_hz),
            forward_lsb_ua=tile.power_on_adc(False).lsb, backward_lsb_ua=tile.power_on_adc(True).lsb,
            read_lsb_us=tile.read_lsb_us, max_payload=MAX_PAYLOAD,
            **{**fields, "capabilities": fields["capabilities"] | (m.WINDOWS_BIT if self.windows else 0)},
        )

    def _on_forward(self, request: m.Forward) -> m.Products:
        tile = self._tile(request.tile)
        origin = (0, 0)
        if request.origin is not None and self.windows:
            origin = self._window(tile, request)
        top = top_code(tile.spec.input_bits)
        if request.codes.size and int(np.abs(request.codes.astype(np.int32)).max()) > top:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"input codes beyond +-{top}")
        x = torch.from_numpy(request.codes.astype(np.float32)) / top
        if request.transpose:
            currents, lsb = tile.backward(x, request.outputs, origin), tile.backward_adc.lsb
        else:
            currents, lsb = tile.forward(x, request.outputs, origin), tile.forward_adc.lsb
        dtype = np.int8 if tile.spec.output_bits <= 8 else np.int16
        codes = torch.round(currents.cpu() / lsb).numpy().astype(dtype)
        return m.Products(request.tile, request.transpose, codes)

    @staticmethod
    def _window(tile: EmulatedTile, request: m.Forward) -> tuple[int, int]:
        """A FORWARD's window, checked in SPEC.md §8.5's order: its origin on the tile, then its
        width and its outputs from there to the tile's edge."""
        rows, cols = tile.spec.rows, tile.spec.cols
        row, col = request.origin
        if not (row < rows and col < cols):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"window origin ({row}, {col}) lies outside the {rows}x{cols} tile")
        (driven, start, lines), (converted, first, outs) = (
            ((cols, col, "columns"), (rows, row, "rows")) if request.transpose else ((rows, row, "rows"), (cols, col, "columns")))
        width = request.codes.shape[1]
        if not 1 <= width <= driven - start:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"width {width} from {lines[:-1]} {start} passes the edge of the "
                          f"{rows}x{cols} tile ({driven - start} {lines} left)")
        if not 1 <= request.outputs <= converted - first:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"{request.outputs} outputs from {outs[:-1]} {first} pass the edge "
                          f"of the {rows}x{cols} tile ({converted - first} {outs} left)")
        return row, col

    def _on_readmap(self, request: m.ReadMap) -> m.Map:
        tile = self._tile(request.tile)
        window = (request.r0, request.r1, request.c0, request.c1)
        rows, cols = tile.spec.rows, tile.spec.cols
        # Refuse a window off the tile before reading anything: a read draws noise and costs cycles.
        if not (request.r0 < request.r1 <= rows and request.c0 < request.c1 <= cols):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"window {window} does not fit a {rows}x{cols} tile")
        if request.array == 0:
            values = tile.read_conductances(window)
        elif request.array == 1:
            values = tile.read_reference()[request.r0 : request.r1, request.c0 : request.c1]
        else:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"array {request.array} is neither 0 (weights) nor 1 (references)")
        codes = torch.round(values.cpu() / tile.read_lsb_us).numpy().astype(np.uint16)
        return m.Map(request.tile, request.array, *window, codes)

    def _on_pulsessparse(self, request: m.PulsesSparse) -> m.PulsesApplied:
        tile = self._tile(request.tile)
        rows, cols = request.rows.astype(np.int64), request.cols.astype(np.int64)
        if rows.size and (rows.max() >= tile.spec.rows or cols.max() >= tile.spec.cols):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, "a pulse entry addresses a device outside the tile")
        flat = rows * tile.spec.cols + cols
        if np.unique(flat).size != flat.size:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, "a device is listed twice in one PULSES_SPARSE")
        counts = torch.zeros(tile.spec.rows * tile.spec.cols, dtype=torch.int64)
        counts[torch.from_numpy(flat)] = torch.from_numpy(request.pulses.astype(np.int64))
        applied = tile.apply_pulses(counts.reshape(tile.spec.rows, tile.spec.cols)).cpu().flatten()
        return m.PulsesApplied(request.tile, 0, applied[flat].numpy().astype(np.int16).reshape(1, -1))

    @staticmethod
    def _block(tile: EmulatedTile, shape: tuple[int, ...], what: str) -> None:
        """A matrix request covers the tile's top-left rows x cols block (SPEC.md §4.4-4.5)."""
        rows, cols = shape
        if not (1 <= rows <= tile.spec.rows and 1 <= cols <= tile.spec.cols):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE,
                          f"{what} of {rows}x{cols} devices does not fit a {tile.spec.rows}x{tile.spec.cols} tile")

    def _on_pulsesdense(self, request: m.PulsesDense) -> m.PulsesApplied:
        tile = self._tile(request.tile)
        self._block(tile, request.values.shape, "PULSES_DENSE")
        rows, cols = request.values.shape
        counts = torch.zeros(tile.spec.rows, tile.spec.cols, dtype=torch.int64)
        counts[:rows, :cols] = torch.from_numpy(request.values.astype(np.int64))
        applied = tile.apply_pulses(counts)[:rows, :cols]
        return m.PulsesApplied(request.tile, 1, applied.cpu().numpy().astype(np.int16))

    def _on_program(self, request: m.Program) -> m.ProgramReport:
        tile = self._tile(request.tile)
        if request.array not in (0, 1):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"array {request.array} is neither 0 (weights) nor 1 (references)")
        self._block(tile, request.targets.shape, "PROGRAM")
        tolerance = request.tolerance_us
        if tolerance != 0 and not (math.isfinite(tolerance) and tolerance > 0):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"tolerance {tolerance} uS is neither 0 (the default) nor finite and positive")
        rows, cols = request.targets.shape
        targets = torch.full((tile.spec.rows, tile.spec.cols), float("nan"))
        targets[:rows, :cols] = torch.from_numpy(request.targets)
        mask = ~torch.isnan(targets)
        targets = torch.where(mask, targets, torch.full_like(targets, tile.spec.g_min_us))  # unselected: any safe value
        program = tile.program_reference if request.array == 1 else tile.program_verify
        result = program(targets, mask, tolerance or None, request.max_trials or None)
        return m.ProgramReport(
            request.tile, request.array, result.reached_us.cpu()[:rows, :cols].numpy().astype(np.float32),
            result.trials.cpu()[:rows, :cols].numpy().astype(np.uint16), result.failed.cpu()[:rows, :cols].numpy(),
        )

    def _on_programdevices(self, request: m.ProgramDevices) -> m.DevicesReport:
        tiles = list(self.board)
        spec = tiles[0].spec
        for tile in np.unique(request.tiles).tolist():
            self._tile(tile)
        if request.arrays.size and int(request.arrays.max()) > 1:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, "an array is neither 0 (weights) nor 1 (references)")
        per_tile = spec.rows * spec.cols
        if request.places.size and int(request.places.max()) >= per_tile:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"a place is beyond the {spec.rows}x{spec.cols} tile")
        trials = request.max_trials or spec.default_max_trials
        if trials > m.MAX_REPORTED_TRIALS:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"max_trials {trials} does not fit the report's u8 trials")
        if request.targets.dtype.kind == "f":
            targets = torch.from_numpy(request.targets.astype(np.float32))
        else:
            if request.targets.size and int(request.targets.max()) >= spec.levels:
                raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"a target level is beyond the board's {spec.levels} levels")
            targets = spec.level_conductance(torch.from_numpy(request.targets.astype(np.int64)))
        devices = torch.from_numpy(request.tiles.astype(np.int64) * per_tile + request.places.astype(np.int64))
        reference = torch.from_numpy(request.arrays.astype(bool))
        result = self._group(range(len(tiles))).program_places(devices, targets, reference,
                                                               request.tolerance_us or None, trials)
        codes = torch.round(result.reached_us.cpu() / tiles[0].read_lsb_us).numpy().astype(np.uint16)
        return m.DevicesReport(codes, result.trials.cpu().numpy().astype(np.uint8), result.failed.cpu().numpy())

    def _on_layerforward(self, request: m.LayerForward) -> m.LayerProducts:
        tiles = [self._tile(index) for index in request.tiles.tolist()]
        spec = tiles[0].spec
        try:
            out_form = CodeFormat(request.out_format)
        except ValueError:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"output format {request.out_format} is not a code format") from None
        widest = request.row_blocks * top_code(spec.output_bits)  # the largest |sum| of the row blocks' codes
        if out_form == CodeFormat.I8_ZERO_RUNS or widest > {CodeFormat.I8: 127}.get(out_form, 32767):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"sums of {request.row_blocks} row blocks of {spec.output_bits}-bit "
                          f"codes do not fit output format {out_form.name}")
        cut = LayerCut(request.in_features, request.out_features, request.row_blocks, request.col_blocks)
        codes, convolution = torch.from_numpy(request.codes.astype(np.float32)), None
        if request.geometry is not None:
            g = request.geometry
            if g.channel_order not in (0, 1):
                raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"channel order {g.channel_order} is neither 0 (C,H,W) nor 1 (H,W,C)")
            convolution = Convolution(g.channels, g.height, g.width, g.kernel, g.stride, g.padding, g.dilation)
            if g.channel_order == 0:
                codes = codes.view(len(codes), g.channels, g.height, g.width)
            else:
                codes = codes.view(len(codes), g.height, g.width, g.channels).permute(0, 3, 1, 2)
        lsbs = {tile.forward_adc.lsb for tile in tiles}
        if len(lsbs) > 1:  # the row blocks' codes are summed, and the sum read with one LSB
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"the layer's tiles convert with {len(lsbs)} different ADC ranges; "
                          "LAYER_FORWARD needs one")
        origins = request.origins.tolist() if request.origins is not None and self.windows else None
        currents = layer_products(self._group(request.tiles.tolist()), cut, codes, convolution, origins)
        outputs = torch.round(currents.cpu() / tiles[0].forward_adc.lsb)
        return m.LayerProducts(request.out_format, outputs.numpy().astype(np.int16))

    def _on_setadcrange(self, request: m.SetAdcRange) -> m.AdcRange:
        tile = self._tile(request.tile)
        if request.direction not in (0, 1):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"direction {request.direction} is neither 0 (forward) nor 1 (transpose)")
        full_scale = request.full_scale_ua
        if full_scale != 0 and not (math.isfinite(full_scale) and full_scale > 0):
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"full scale {full_scale} uA is neither 0 (power-on) nor finite "
                          "and positive")
        lsb = tile.set_adc_range(full_scale or None, transpose=bool(request.direction))
        return m.AdcRange(request.tile, request.direction, lsb)

    def _on_readcounters(self, request: m.ReadCounters) -> m.CountersReply:
        c = self._tile(request.tile).counters
        return m.CountersReply(
            request.tile, c.cycles, c.products, c.transpose_products, c.pulses, c.device_reads, c.verify_trials,
            c.energy_nj,
        )

    def _on_reset(self, request: m.Reset) -> m.Ack:
        if request.mode == 0:
            for tile in self.board:
                tile.counters = Counters(clock_hz=tile.counters.clock_hz)
        elif request.mode == 1:
            self.board = self.make_board()
            self._groups.clear()
        else:
            raise Refusal(m.ErrorCode.OUT_OF_RANGE, f"RESET mode {request.mode} is neither 0 nor 1")
        return m.Ack(m.Reset.TYPE)
