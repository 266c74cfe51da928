"""Symmetry-point search on a whole tile at once (../shared/DOMAIN.md, zero-shifting).

Every device gets alternating up/down pulse pairs in parallel; after each block of pairs the
tile is read several times and averaged. A device has converged when the mean of its last
``window_blocks`` block estimates differs by less than the tolerance from the same mean
``baseline_blocks`` blocks earlier. The baseline is long on purpose: a device approaches G*
exponentially, and on fine-step devices the approach is slow, so two consecutive blocks
differ by far less than the distance still to go; over a baseline of a few time constants
the change is about that distance itself.

A block is an odd number of pulses of one strictly alternating train, so the reads follow an
up pulse and a down pulse in turn. Neither sits at G*: in the steady state the device after a down pulse is (1 - r) steps
below it and after an up pulse r steps above, r = a_up / (a_up + a_down), which is where G*
lies in the range, (G* - G_min) / (G_max - G_min). After convergence the next
``settle_blocks`` estimates are averaged by kind, D and U, and G* = r D + (1 - r) U, with r
from their own mean and the spec's range: exact for soft-bounds devices, where either mean
alone is biased by a fraction of a step (on strongly imbalanced fine-step devices that bias
alone put 2 % of them more than a step off). The uncertainty is the standard error of that
combination. The search ends each device at the phase of its cycle nearest G*.

A device that does not respond to pulses (stuck) never changes, so it would pass any
convergence rule: it is flagged stuck unless it moved significantly, in the direction pushed,
under a probe or over the whole search (``stuck_sigmas`` standard deviations of the read
noise of what is compared), and never reported as converged. Devices that do not converge
within the pulse budget are flagged as well; neither kind is averaged in.
"""

from __future__ import annotations

import torch
from pydantic import Field
from tqdm import tqdm

from calibration.results import CalibrationResult, ResultMetadata
from cim_hil.config import Strict
from cim_hil.errors import UnsafeValueError
from cim_hil.tile import Capability, Tile, averaged_read


class SymmetrySearchConfig(Strict):
    pairs_per_block: int = Field(10, ge=1, description="up/down pulse pairs between reads")
    reads_per_estimate: int = Field(4, ge=1, description="reads averaged per block estimate")
    max_pairs: int = Field(2000, ge=1, description="pulse budget, in pairs per device")
    tolerance_levels: float = Field(0.25, gt=0.0, description="convergence: change over the baseline, in levels")
    baseline_blocks: int = Field(10, ge=1, description="convergence: blocks between the two compared means")
    window_blocks: int = Field(4, ge=1, description="convergence: block estimates in each compared mean (even: as "
                               "many after up as after down pulses)")
    settle_blocks: int = Field(20, ge=2, description="block estimates averaged after convergence")
    probe_pulses: int = Field(10, ge=1, description="pulses of the stuck-device probe")
    probe_reads: int = Field(8, ge=2, description="reads averaged for each state of the probe")
    stuck_sigmas: float = Field(5.0, gt=0.0, description="a move this many noise std is a response, not noise")


def _pooled_noise(reads: torch.Tensor) -> float:
    """Read-noise std of one read, pooled over every device (unbiased variances, so a few reads
    per device do not underestimate it)."""
    return float(reads.var(0, unbiased=True).mean().sqrt())


def find_stuck(tile: Tile, config: SymmetrySearchConfig) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Devices that move neither up under up pulses nor down under down pulses, beyond
    ``stuck_sigmas`` noise std of the averaged reads; also returns the read-noise std of one
    read and the averaged start conductances (what the search compares against at the end)."""
    n = config.probe_reads
    reads = torch.stack([tile.read_conductances().float().cpu() for _ in range(n)])
    read_noise = _pooled_noise(reads)
    start = reads.mean(0)
    probe = torch.full((tile.spec.rows, tile.spec.cols), config.probe_pulses, dtype=torch.int64)
    tile.apply_pulses(probe)
    up = averaged_read(tile.read_conductances, n)
    tile.apply_pulses(-probe)
    down = averaged_read(tile.read_conductances, n)
    threshold = config.stuck_sigmas * read_noise * (2 / n) ** 0.5 + 1e-3 * tile.spec.level_spacing_us
    moved = (up - start > threshold) | (up - down > threshold)  # one-sided: the direction each probe pushes
    return ~moved, read_noise, start


def find_symmetry_points(tile: Tile, config: SymmetrySearchConfig | None = None, progress: bool = True,
                         tile_index: int = 0, board_info: dict | None = None) -> CalibrationResult:
    config = config or SymmetrySearchConfig()
    if not tile.spec.supports(Capability.PULSES):
        raise UnsafeValueError("symmetry-point search needs a tile that takes programming pulses")
    tolerance = config.tolerance_levels * tile.spec.level_spacing_us
    shape = (tile.spec.rows, tile.spec.cols)
    blocks = config.max_pairs // config.pairs_per_block
    if blocks < 1:
        raise UnsafeValueError(f"max_pairs ({config.max_pairs}) is smaller than pairs_per_block ({config.pairs_per_block})")
    silent, read_noise, start = find_stuck(tile, config)
    pair = torch.ones(shape, dtype=torch.int64)
    span = config.baseline_blocks + config.window_blocks  # block estimates the rule looks at
    history: list[torch.Tensor] = []
    converged_at = torch.full(shape, -1, dtype=torch.int64)  # block index of convergence
    # Settled block estimates by the pulse they follow: [after down, after up].
    sums, squares, counts = (torch.zeros(2, *shape) for _ in range(3))
    pulses_used, sign = 0, 1
    bar = tqdm(range(blocks), desc="symmetry point", disable=not progress, leave=False)
    for block in bar:
        # One train of strictly alternating pulses, 2 * pairs_per_block + 1 of them a block, so
        # the reads follow an up pulse and a down pulse in turn (a repeated pulse would kick the
        # device off its cycle for a time constant).
        for _ in range(2 * config.pairs_per_block + 1):
            tile.apply_pulses(sign * pair)
            sign = -sign
        pulses_used += 2 * config.pairs_per_block + 1
        last = int(sign < 0)  # the pulse before this read: 1 up, 0 down
        estimate = averaged_read(tile.read_conductances, config.reads_per_estimate)
        history = [*history[-(span - 1):], estimate]
        if len(history) == span:
            recent = torch.stack(history[-config.window_blocks:]).mean(0)
            past = torch.stack(history[: config.window_blocks]).mean(0)
            newly = (converged_at < 0) & ((recent - past).abs() < tolerance)
            converged_at[newly] = block
        settling = (converged_at >= 0) & (converged_at < block) & (counts.sum(0) < config.settle_blocks)
        sums[last] += torch.where(settling, estimate, 0.0)
        squares[last] += torch.where(settling, estimate**2, 0.0)
        counts[last] += settling.float()
        finished = counts.sum(0) >= config.settle_blocks  # a stuck device settles at once, never moving
        bar.set_postfix(done=f"{100 * float(finished.float().mean()):.1f}%")
        if bool(finished.all()):
            break
    valid = (counts.sum(0) >= config.settle_blocks) & (counts > 0).all(0)
    n = counts.clamp(min=1)
    means = sums / n  # D, U
    variances = (squares / n - means**2).clamp(min=0) / n  # of each mean
    low, high = tile.spec.g_min_us, tile.spec.g_max_us
    r = ((means.mean(0) - low) / (high - low)).clamp(0, 1)
    mean = r * means[0] + (1 - r) * means[1]
    uncertainty = (r**2 * variances[0] + (1 - r) ** 2 * variances[1]).sqrt()
    # Leave each device at the phase of its cycle nearest G*: after a down pulse when r > 1/2,
    # else after an up pulse, within half a step of it (what zero-shift then measures against).
    last_pulse = -1 if last else 1  # what ends a device's cycle where it is now: the other sign
    final = torch.where((r > 0.5) if last else (r < 0.5), last_pulse, 0).to(torch.int64)
    if final.any():
        tile.apply_pulses(final)
        pulses_used += 1
    # A device silent under the probe responded after all if the search moved it from where it
    # started by far more than the noise of the two means (say, its symmetry point is far from
    # its start while its steps are too small for the probe); else it is stuck.
    settled = counts.sum(0).clamp(min=1)
    moved_far = valid & ((mean - start).abs() > config.stuck_sigmas * read_noise * (
        1 / config.probe_reads + 1 / (config.reads_per_estimate * settled)) ** 0.5)
    stuck = silent & ~moved_far
    symmetry = torch.where(valid & ~stuck, mean, torch.nan)
    not_converged = ~valid & ~stuck
    found = ~torch.isnan(symmetry)
    metadata = ResultMetadata(
        kind="symmetry_point",
        board=board_info or {},
        tile=tile_index,
        settings=config.model_dump(),
        summary={
            "devices": symmetry.numel(),
            "converged": int(found.sum()),
            "stuck": int(stuck.sum()),
            "not_converged": int(not_converged.sum()),
            "pairs_per_device": pulses_used // 2,
            "pulses_per_device": pulses_used + 2 * config.probe_pulses,
            "read_noise_us": read_noise,
            "symmetry_mean_us": float(symmetry[found].mean()) if found.any() else None,
            "symmetry_std_us": float(symmetry[found].std()) if int(found.sum()) > 1 else None,
        },
    )
    return CalibrationResult(metadata, {
        "symmetry_us": symmetry.numpy(),
        "uncertainty_us": uncertainty.numpy(),
        "stuck": stuck.numpy(),
        "not_converged": not_converged.numpy(),
    })
