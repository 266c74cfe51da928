"""Calibration results as typed, versioned files: pydantic metadata plus numpy arrays, in one
``.npz`` file that loads back into the same object."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from cim_hil.errors import CimHilError

FORMAT_VERSION = 1


class ResultMetadata(BaseModel):
    kind: Literal["symmetry_point", "zero_shift", "characterisation"]
    format_version: int = FORMAT_VERSION
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    board: dict[str, Any] = {}
    tile: int = 0
    settings: dict[str, Any] = {}
    summary: dict[str, Any] = {}


class CalibrationResult:
    """Metadata plus named arrays; ``save`` / ``load`` round-trip them exactly."""

    def __init__(self, metadata: ResultMetadata, arrays: dict[str, np.ndarray]) -> None:
        self.metadata = metadata
        self.arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def save(self, path: str | Path) -> Path:
        path = Path(path).with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, _metadata=np.array(self.metadata.model_dump_json()), **self.arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationResult":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as stored:
                metadata = ResultMetadata.model_validate(json.loads(str(stored["_metadata"])))
                arrays = {name: stored[name] for name in stored.files if name != "_metadata"}
        except (OSError, KeyError, ValueError, ValidationError) as error:
            raise CimHilError(f"{path} is not a cim-hil calibration file: {error}") from None
        if metadata.format_version > FORMAT_VERSION:
            raise CimHilError(f"{path} has format version {metadata.format_version}; this cim-hil reads up to {FORMAT_VERSION}")
        return cls(metadata, arrays)
