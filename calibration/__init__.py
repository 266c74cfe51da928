"""Calibration through the Tile interface only: symmetry points, zero-shift, characterisation."""

from calibration.characterise import CharacterisationConfig, characterise, emulator_config_from_fit, fit_soft_bounds
from calibration.results import CalibrationResult
from calibration.symmetry import SymmetrySearchConfig, find_symmetry_points
from calibration.zero_shift import calibrate_references, zero_shift

__all__ = [
    "CalibrationResult",
    "CharacterisationConfig",
    "SymmetrySearchConfig",
    "calibrate_references",
    "characterise",
    "emulator_config_from_fit",
    "find_symmetry_points",
    "fit_soft_bounds",
    "zero_shift",
]
