"""The hardware abstraction layer: one ``Tile`` interface for every crossbar backend.

The trainer and the calibration routines talk to this class only. Public methods check their
arguments here, once for every backend, and hand clean tensors to the backend's ``_``-methods;
an operation a backend lacks raises :class:`CapabilityError` instead of being faked.

Units: conductances in microsiemens (uS); product inputs are fractions of the DAC full scale
in [-1, 1]; product outputs are column (or row) currents in microamperes (uA), as the ADC
reports them.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum

import torch

from cim_hil.errors import CapabilityError, ShapeError, UnsafeValueError

MAX_TRIALS = 0xFFFF  # the most write-verify trials per device one call may ask (a u16 on the wire)
MAX_VERIFY_WORK = 1 << 23  # selected devices x max_trials one write-verify call may take: its memory
Window = tuple[int, int, int, int]
"""A rectangle of devices, half-open: (row_start, row_stop, col_start, col_stop)."""


class Capability(StrEnum):
    """What a backend can do; the trainer and calibration ask before they rely on it."""

    ANALOG_PRODUCTS = "analog_products"  # the array itself computes vector-matrix products
    COMPUTED_PRODUCTS = "computed_products"  # products computed on the host from conductance reads
    TRANSPOSE = "transpose"  # products with the transposed array (backward pass)
    PULSES = "pulses"  # open-loop signed programming pulses
    WRITE_VERIFY = "write_verify"  # program-with-verify to target conductances
    REFERENCE = "reference"  # per-device reference conductances that can be programmed
    ADC_RANGE = "adc_range"  # the host can set the full scale of a tile's output ADC


@dataclass(frozen=True)
class TileSpec:
    """Shape and limits of one tile, as its backend reports them."""

    rows: int
    cols: int
    input_bits: int
    output_bits: int
    g_min_us: float
    g_max_us: float
    levels: int
    v_read: float
    max_pulses_per_call: int
    default_tolerance_us: float  # write-verify tolerance when a call names none
    default_max_trials: int  # write-verify budget, in trials per device, when a call names none
    capabilities: frozenset[Capability]

    @property
    def level_spacing_us(self) -> float:
        return (self.g_max_us - self.g_min_us) / (self.levels - 1)

    def level_conductance(self, levels: torch.Tensor) -> torch.Tensor:
        """The conductance (uS, float32) of level indices (integers): g_min + level x spacing,
        kept within the safe range against float rounding at the top. A host and a board that
        both compute targets from levels this way agree to the bit (SPEC.md §8.2)."""
        conductance = (levels.to(torch.int64) * self.level_spacing_us).add_(self.g_min_us)
        return conductance.clamp_(self.g_min_us, self.g_max_us)

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities


@dataclass
class Counters:
    """What a tile (or a board, summed) has done; ``seconds`` follows from cycles and clock."""

    clock_hz: float
    cycles: int = 0
    products: int = 0
    transpose_products: int = 0
    pulses: int = 0
    device_reads: int = 0
    verify_trials: int = 0
    energy_nj: float = 0.0
    link_bytes_out: int = 0
    link_bytes_in: int = 0

    @property
    def seconds(self) -> float:
        return self.cycles / self.clock_hz

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "seconds": self.seconds}

    def __add__(self, other: "Counters") -> "Counters":
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        summed["clock_hz"] = self.clock_hz
        return Counters(**summed)

    @classmethod
    def total(cls, each: list["Counters"]) -> "Counters":
        """The sum of several tiles' (or boards') counters, at the first one's clock."""
        total = cls(clock_hz=each[0].clock_hz)
        for counters in each:
            total = total + counters
        return total


@dataclass
class ProgramResult:
    """What program-with-verify achieved, device by device; failures are reported, not hidden.

    ``reached_us`` is the last verify read of each attempted device (what the host can know),
    NaN where no programming was asked for; ``failed`` marks attempted devices still outside
    the tolerance when their trial budget ran out.
    """

    reached_us: torch.Tensor
    trials: torch.Tensor
    failed: torch.Tensor
    tolerance_us: float = field(default=0.0)

    @property
    def n_failed(self) -> int:
        return int(self.failed.sum())

    @property
    def n_attempted(self) -> int:
        return int((self.trials > 0).sum())


def averaged_read(read: Callable[[], torch.Tensor], count: int) -> torch.Tensor:
    """Mean, on the host, of ``count`` calls of ``read`` (a tile's ``read_conductances`` or
    ``read_reference``): each read has fresh noise, so the mean's noise falls as 1/sqrt(count)."""
    return torch.stack([read().float().cpu() for _ in range(count)]).mean(0)


class Tile(ABC):
    """One crossbar with its periphery. Subclasses implement the ``_``-methods. Several tiles of
    a board work as one through the group the board hands out (``board.group(tiles)``)."""

    spec: TileSpec
    counters: Counters

    # ---- products -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, outputs: int | None = None, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Column currents (uA) of shape (batch, outputs) for a batch of row inputs ``x``.

        ``x`` has shape (batch, k): rows r..r+k-1 are driven, the others held at 0 V, where
        ``origin`` = (r, c) is the corner of the window the product runs on (a block packed
        beside others on the tile). Only columns c..c+outputs-1 (to the tile's edge if None) are
        converted, as the periphery converts only the columns asked for: a layer smaller than
        the tile pays for the part it uses.
        """
        if not self.spec.supports(Capability.COMPUTED_PRODUCTS):
            self._require(Capability.ANALOG_PRODUCTS)
        return self._windowed(x, outputs, origin, transpose=False)

    def backward(self, d: torch.Tensor, outputs: int | None = None, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Row currents (uA) of shape (batch, outputs) for column inputs ``d`` of shape
        (batch, k), driving columns c..c+k-1 and converting rows r..r+outputs-1 where
        ``origin`` = (r, c); as :meth:`forward` with rows and columns swapped."""
        self._require(Capability.TRANSPOSE)
        return self._windowed(d, outputs, origin, transpose=True)

    def _windowed(self, x: torch.Tensor, outputs: int | None, origin: tuple[int, int], transpose: bool) -> torch.Tensor:
        rows, cols = (self.spec.cols, self.spec.rows) if transpose else (self.spec.rows, self.spec.cols)
        start, first = (int(origin[1]), int(origin[0])) if transpose else (int(origin[0]), int(origin[1]))
        if not (0 <= start < rows and 0 <= first < cols):
            raise ShapeError(f"origin {tuple(origin)} lies outside the {self.spec.rows}x{self.spec.cols} tile")
        what = "backward input" if transpose else "forward input"
        x = self._batch(x, rows - start, what + f" at origin {tuple(origin)}" if start else what)
        if outputs is None:
            width = cols - first
        else:  # past the tile's edge from the window's first output: named as such
            named = f"outputs from {'row' if transpose else 'column'} {first} (origin {tuple(origin)})" if first else "outputs"
            width = checked_integer(outputs, named, 1, cols - first, ShapeError)
        if not (start or first):
            return (self._backward if transpose else self._forward)(x, width)
        return self._window_product(x, width, (int(origin[0]), int(origin[1])), transpose)

    def _window_product(self, x: torch.Tensor, outputs: int, origin: tuple[int, int], transpose: bool) -> torch.Tensor:
        """The backend hook for a checked product on the window at ``origin`` (row, col). The
        plain version is the product with zeros before the window, its outputs before the
        window dropped; a board whose firmware takes a window sends it instead."""
        start, first = (origin[1], origin[0]) if transpose else origin
        product = self._backward if transpose else self._forward
        return product(pad_inputs(x, start), first + outputs)[:, first:]

    def set_adc_range(self, full_scale_ua: float | None, transpose: bool = False) -> float:
        """Set the full scale (uA) of the ADC that converts this tile's forward (or transpose)
        outputs, None for the power-on one; returns the LSB now in force (uA per code), which
        is what the products' currents are read back with. A backend may set the nearest
        full scale its periphery allows, so the LSB returned is the one to believe."""
        self._require(Capability.ADC_RANGE)
        if transpose:
            self._require(Capability.TRANSPOSE)
        if full_scale_ua is not None:
            try:
                if isinstance(full_scale_ua, bool):
                    raise TypeError
                full_scale_ua = float(full_scale_ua)
            except (TypeError, ValueError):
                raise UnsafeValueError(f"an ADC full scale must be a number of uA, got {full_scale_ua!r}") from None
            if not 0 < full_scale_ua < math.inf:
                raise UnsafeValueError(f"an ADC full scale must be positive and finite, got {full_scale_ua} uA; "
                                       "nothing was set")
        return self._set_adc_range(full_scale_ua, bool(transpose))

    # ---- conductances ---------------------------------------------------------------------
    def read_conductances(self, window: Window | None = None) -> torch.Tensor:
        """One noisy read of the weight devices (uS), the whole tile or a window."""
        return self._read_conductances(self._window(window))

    def apply_pulses(self, counts: torch.Tensor) -> torch.Tensor:
        """Apply signed pulse counts (+ up / SET, - down / RESET), one entry per device.

        Returns the counts actually applied (a backend may refuse some; the caller accounts for
        exactly what was applied).
        """
        self._require(Capability.PULSES)
        counts = self._matrix(counts, "pulse counts")
        if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise ShapeError(f"pulse counts must be an integer tensor, got {counts.dtype}")
        cap = self.spec.max_pulses_per_call
        if counts.numel():
            # Both ends, never abs(): INT_MIN (what NaN or inf become as integers) has no
            # positive twin, and its abs() is itself.
            lowest, highest = (int(v) for v in torch.aminmax(counts))
            if lowest < -cap or highest > cap:
                worst = lowest if lowest < -cap else highest
                raise UnsafeValueError(
                    f"pulse count {worst} exceeds max_pulses_per_call ({cap}); nothing was applied"
                )
        return self._apply_pulses(counts.to(torch.int64))

    def program_verify(
        self,
        targets_us: torch.Tensor,
        mask: torch.Tensor | None = None,
        tolerance_us: float | None = None,
        max_trials: int | None = None,
    ) -> ProgramResult:
        """Write-verify the weight devices selected by ``mask`` (all if None) to ``targets_us``."""
        self._require(Capability.WRITE_VERIFY)
        targets, mask, tolerance, trials = self._program_args(targets_us, mask, tolerance_us, max_trials)
        return self._program_verify(targets, mask, tolerance, trials, reference=False)

    # ---- reference devices (zero-shifting) ------------------------------------------------
    def read_reference(self) -> torch.Tensor:
        """One noisy read of the reference devices (uS)."""
        self._require(Capability.REFERENCE)
        return self._read_reference()

    def program_reference(
        self,
        targets_us: torch.Tensor,
        mask: torch.Tensor | None = None,
        tolerance_us: float | None = None,
        max_trials: int | None = None,
    ) -> ProgramResult:
        """Write-verify the reference devices to ``targets_us`` (zero-shifting)."""
        self._require(Capability.REFERENCE)
        targets, mask, tolerance, trials = self._program_args(targets_us, mask, tolerance_us, max_trials)
        return self._program_verify(targets, mask, tolerance, trials, reference=True)

    # ---- backend hooks --------------------------------------------------------------------
    @abstractmethod
    def _forward(self, x: torch.Tensor, outputs: int) -> torch.Tensor: ...

    def _backward(self, d: torch.Tensor, outputs: int) -> torch.Tensor:
        raise CapabilityError("this tile has no transpose products")

    @abstractmethod
    def _read_conductances(self, window: Window) -> torch.Tensor: ...

    def _apply_pulses(self, counts: torch.Tensor) -> torch.Tensor:
        raise CapabilityError("this tile cannot apply pulses")

    def _program_verify(
        self, targets: torch.Tensor, mask: torch.Tensor, tolerance_us: float, max_trials: int, reference: bool
    ) -> ProgramResult:
        raise CapabilityError("this tile cannot program with verify")

    def _read_reference(self) -> torch.Tensor:
        raise CapabilityError("this tile has no reference devices")

    def _set_adc_range(self, full_scale_ua: float | None, transpose: bool) -> float:
        raise CapabilityError("this tile cannot set its ADC range")

    # ---- argument checks shared by every backend ------------------------------------------
    def _require(self, capability: Capability) -> None:
        if not self.spec.supports(capability):
            raise CapabilityError(f"this tile does not support '{capability}'")

    def _batch(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        x = _real_tensor(x, what)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2 or not 1 <= x.shape[1] <= width:
            raise ShapeError(f"{what} must have shape (batch, k) with 1 <= k <= {width}, got {tuple(x.shape)}")
        require_finite(x, f"{what} contains")
        return x

    @staticmethod
    def _outputs(outputs: int | None, width: int) -> int:
        if outputs is None:
            return width
        return checked_integer(outputs, "outputs", 1, width, ShapeError)

    def _matrix(self, values: torch.Tensor, what: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        values = _real_tensor(values, what)
        expected = expected or (self.spec.rows, self.spec.cols)
        if tuple(values.shape) != expected:
            raise ShapeError(f"{what} must have shape {expected}, got {tuple(values.shape)}")
        return values

    def _window(self, window: Window | None) -> Window:
        if window is None:
            return (0, self.spec.rows, 0, self.spec.cols)
        if not isinstance(window, (tuple, list)) or len(window) != 4:
            raise ShapeError(f"window must be (row_start, row_stop, col_start, col_stop), got {window!r}")
        r0, r1, c0, c1 = (checked_integer(v, "a window bound", 0, 1 << 31, ShapeError) for v in window)
        if not (0 <= r0 < r1 <= self.spec.rows and 0 <= c0 < c1 <= self.spec.cols):
            raise ShapeError(
                f"window {window} does not fit a {self.spec.rows}x{self.spec.cols} tile"
            )
        return (r0, r1, c0, c1)

    def _program_args(self, targets_us, mask, tolerance_us, max_trials, tiles: int | None = None):
        """Checked targets, mask, tolerance and trial budget; ``tiles`` stacks that many tiles
        (a group's)."""
        shape = (self.spec.rows, self.spec.cols) if tiles is None else (tiles, self.spec.rows, self.spec.cols)
        targets = self._matrix(targets_us, "targets", shape).to(torch.float32)
        mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else self._matrix(mask, "mask", shape).bool()
        self._check_targets(targets[mask.to(targets.device)])
        tolerance, trials = self._verify_limits(tolerance_us, max_trials)
        work = int(mask.sum()) * trials
        if work > MAX_VERIFY_WORK:
            raise UnsafeValueError(
                f"{int(mask.sum())} devices x max_trials {trials} = {work} device-trials exceeds the "
                f"{MAX_VERIFY_WORK} one write-verify call may take; program fewer devices per call or "
                "lower max_trials (nothing was programmed)"
            )
        return targets, mask, tolerance, trials

    def _check_targets(self, targets: torch.Tensor) -> None:
        low, high = self.spec.g_min_us, self.spec.g_max_us
        if not targets.numel():
            return
        lowest, highest = torch.aminmax(targets)
        if not (bool(lowest >= low) and bool(highest <= high)):  # compared in the targets' dtype; false for NaN too
            if not torch.isfinite(targets).all():
                raise UnsafeValueError("targets contain NaN or infinite values; nothing was programmed")
            outside = (targets < low) | (targets > high)
            raise UnsafeValueError(
                f"{int(outside.sum())} target(s) outside the safe conductance range "
                f"[{low}, {high}] uS (e.g. {float(targets[outside][0]):.3g} uS); nothing was programmed"
            )

    def _verify_limits(self, tolerance_us: float | None, max_trials: int | None) -> tuple[float, int]:
        try:
            tolerance = self.spec.default_tolerance_us if tolerance_us is None else float(tolerance_us)
        except (TypeError, ValueError):
            raise UnsafeValueError(f"tolerance_us must be a number, got {tolerance_us!r}") from None
        if not 0 < tolerance < math.inf:
            raise UnsafeValueError(f"tolerance_us must be positive and finite, got {tolerance_us}")
        if max_trials is None:
            return tolerance, self.spec.default_max_trials
        return tolerance, checked_integer(max_trials, "max_trials", 1, MAX_TRIALS, UnsafeValueError)


def pad_inputs(x: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` (batch, k) on lines start..start+k-1 of a product: the ``start`` lines before it
    driven with zeros, i.e. held at 0 V. A window's product is this padded product with the
    outputs before the window dropped, on every backend, so a virtual board and the emulator
    agree on it to the bit; a board whose firmware takes a window (protocol v3's windows, SPEC.md
    §8.5) is sent the window instead, and computes the same."""
    padded = x.new_zeros(x.shape[0], start + x.shape[1])
    padded[:, start:] = x
    return padded


def require_finite(x: torch.Tensor, subject: str) -> None:
    """Refuse products of ``x`` with a NaN or infinity in it; ``subject`` starts the message."""
    # One reduction shows any NaN or inf; only when it is not finite (which large but finite
    # values can also cause, e.g. float16 or 1e38) is every element looked at.
    if x.numel() and not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all()):
        raise UnsafeValueError(f"{subject} NaN or infinite values")


def checked_integer(value, name: str, low: int, high: int, error: type[Exception]) -> int:
    """``value`` as an int in [low, high]: an integer (Python, numpy or 0-d torch), never a
    float, bool or string silently truncated; out of range is refused before anything is sent."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise error(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise error(f"{name} must be between {low} and {high}, got {number}")
    return number


def _real_tensor(values, what: str) -> torch.Tensor:
    """``values`` as a real-valued tensor (float, integer or bool), or a clear refusal."""
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise ShapeError(f"{what} must be a tensor of numbers, got {type(values).__name__}") from None
    if tensor.is_complex():
        raise ShapeError(f"{what} must be real-valued, got {tensor.dtype}")
    return tensor
