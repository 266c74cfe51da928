"""Zero-shifting: program each device's reference to its symmetry point, then check that the
read weight W = G - G_ref is near zero (arXiv:1907.10228, steps 3 and 4)."""

from __future__ import annotations

import torch

from calibration.results import CalibrationResult, ResultMetadata
from calibration.symmetry import SymmetrySearchConfig, find_symmetry_points
from cim_hil.errors import CapabilityError
from cim_hil.tile import Capability, Tile, averaged_read


def zero_shift(tile: Tile, symmetry: CalibrationResult, reads: int = 8, tile_index: int = 0,
               board_info: dict | None = None) -> CalibrationResult:
    """Program references to ``symmetry``'s estimates (flagged devices are left alone) and
    report the residual weight per device, in uS."""
    if not tile.spec.supports(Capability.REFERENCE):
        raise CapabilityError("zero-shift needs a tile with reference devices; this tile has none")
    estimates = torch.from_numpy(symmetry["symmetry_us"])
    usable = ~torch.isnan(estimates)
    targets = torch.where(usable, estimates, tile.spec.g_min_us).clamp(tile.spec.g_min_us, tile.spec.g_max_us)
    programmed = tile.program_reference(targets, mask=usable)
    weights = averaged_read(tile.read_conductances, reads)
    references = averaged_read(tile.read_reference, reads)
    residual = torch.where(usable, weights - references, torch.nan)
    failed = programmed.failed.cpu() & usable
    ok = usable & ~failed
    magnitude = residual[ok].abs()
    metadata = ResultMetadata(
        kind="zero_shift",
        board=board_info or {},
        tile=tile_index,
        settings={"reads": reads, "tolerance_us": programmed.tolerance_us},
        summary={
            "references_programmed": int(usable.sum()),
            "programming_failures": int(failed.sum()),
            "residual_mean_us": float(residual[ok].mean()) if ok.any() else None,
            "residual_abs_max_us": float(magnitude.max()) if ok.any() else None,
            "within_one_level_fraction": float((magnitude <= tile.spec.level_spacing_us).float().mean()) if ok.any() else None,
        },
    )
    return CalibrationResult(metadata, {
        "residual_us": residual.numpy(),
        "reference_us": programmed.reached_us.cpu().numpy(),
        "failed": failed.numpy(),
    })


def calibrate_references(tile: Tile, config: SymmetrySearchConfig | None = None, progress: bool = False,
                         tile_index: int = 0, board_info: dict | None = None) -> CalibrationResult:
    """Zero-shift a tile from scratch: find every device's symmetry point, then program each
    reference there. Leaves the devices at their symmetry points, so W = G - G_ref starts near
    zero everywhere (what TTv2's fast array A needs). Returns the zero-shift result."""
    found = find_symmetry_points(tile, config, progress=progress, tile_index=tile_index, board_info=board_info)
    return zero_shift(tile, found, tile_index=tile_index, board_info=board_info)
