"""Symmetry-point search on a whole tile at once (../shared/DOMAIN.md, zero-shifting).

Every device gets alternating up/down pulse pairs in parallel; after each block of pairs the
tile is read several times and averaged. A device has converged when its block estimate moved
less than the tolerance since the previous block; its symmetry point is then the mean of its
next ``settle_blocks`` block estimates (the steady state wanders about one step around G*),
with the standard error of those estimates as its uncertainty. Devices that do not respond to
pulses (stuck) or do not converge within the pulse budget are flagged, never averaged in.
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
    tolerance_levels: float = Field(0.25, gt=0.0, description="convergence: change between blocks, in levels")
    settle_blocks: int = Field(20, ge=1, description="block estimates averaged after convergence")
    probe_pulses: int = Field(10, ge=1, description="pulses of the stuck-device probe")


def find_stuck(tile: Tile, config: SymmetrySearchConfig) -> tuple[torch.Tensor, float]:
    """Devices that move neither up nor down under a probe; also returns the read noise std."""
    reads = torch.stack([tile.read_conductances().float().cpu() for _ in range(max(config.reads_per_estimate, 2))])
    read_noise = float(reads.std(0).mean())
    start = reads.mean(0)
    shape = (tile.spec.rows, tile.spec.cols)
    probe = torch.full(shape, config.probe_pulses, dtype=torch.int64)
    tile.apply_pulses(probe)
    up = averaged_read(tile.read_conductances, config.reads_per_estimate)
    tile.apply_pulses(-probe)
    down = averaged_read(tile.read_conductances, config.reads_per_estimate)
    resolution = 4 * read_noise / config.reads_per_estimate**0.5 + 1e-3 * tile.spec.level_spacing_us
    moved = ((up - start).abs() > resolution) | ((up - down).abs() > resolution)
    return ~moved, read_noise


def find_symmetry_points(tile: Tile, config: SymmetrySearchConfig | None = None, progress: bool = True,
                         tile_index: int = 0, board_info: dict | None = None) -> CalibrationResult:
    config = config or SymmetrySearchConfig()
    if not tile.spec.supports(Capability.PULSES):
        raise UnsafeValueError("symmetry-point search needs a tile that takes programming pulses")
    tolerance = config.tolerance_levels * tile.spec.level_spacing_us
    shape = (tile.spec.rows, tile.spec.cols)
    stuck, read_noise = find_stuck(tile, config)
    pair = torch.ones(shape, dtype=torch.int64)
    previous = averaged_read(tile.read_conductances, config.reads_per_estimate)
    converged_at = torch.full(shape, -1, dtype=torch.int64)  # block index of convergence
    settled_sum = torch.zeros(shape)
    settled_sq = torch.zeros(shape)
    settled_n = torch.zeros(shape)
    blocks = config.max_pairs // config.pairs_per_block
    if blocks < 1:
        raise UnsafeValueError(f"max_pairs ({config.max_pairs}) is smaller than pairs_per_block ({config.pairs_per_block})")
    pairs_used = 0
    bar = tqdm(range(blocks), desc="symmetry point", disable=not progress, leave=False)
    for block in bar:
        for _ in range(config.pairs_per_block):
            tile.apply_pulses(pair)
            tile.apply_pulses(-pair)
        pairs_used += config.pairs_per_block
        estimate = averaged_read(tile.read_conductances, config.reads_per_estimate)
        newly = (converged_at < 0) & ((estimate - previous).abs() < tolerance) & ~stuck
        converged_at[newly] = block
        settling = (converged_at >= 0) & (converged_at < block) & (settled_n < config.settle_blocks)
        settled_sum += torch.where(settling, estimate, 0.0)
        settled_sq += torch.where(settling, estimate**2, 0.0)
        settled_n += settling.float()
        previous = estimate
        done = ((settled_n >= config.settle_blocks) | stuck).float().mean()
        bar.set_postfix(done=f"{100 * float(done):.1f}%")
        if bool(((settled_n >= config.settle_blocks) | stuck).all()):
            break
    valid = settled_n >= config.settle_blocks
    count = settled_n.clamp(min=1)
    mean = settled_sum / count
    spread = (settled_sq / count - mean**2).clamp(min=0).sqrt()
    uncertainty = spread / count.sqrt()
    symmetry = torch.where(valid & ~stuck, mean, torch.nan)
    not_converged = ~valid & ~stuck
    metadata = ResultMetadata(
        kind="symmetry_point",
        board=board_info or {},
        tile=tile_index,
        settings=config.model_dump(),
        summary={
            "devices": symmetry.numel(),
            "converged": int((valid & ~stuck).sum()),
            "stuck": int(stuck.sum()),
            "not_converged": int(not_converged.sum()),
            "pairs_per_device": pairs_used,
            "pulses_per_device": 2 * pairs_used + 2 * config.probe_pulses,
            "read_noise_us": read_noise,
            "symmetry_mean_us": float(symmetry[~torch.isnan(symmetry)].mean()) if valid.any() else None,
            "symmetry_std_us": float(symmetry[~torch.isnan(symmetry)].std()) if int(valid.sum()) > 1 else None,
        },
    )
    return CalibrationResult(metadata, {
        "symmetry_us": symmetry.numpy(),
        "uncertainty_us": uncertainty.numpy(),
        "stuck": stuck.numpy(),
        "not_converged": not_converged.numpy(),
    })
