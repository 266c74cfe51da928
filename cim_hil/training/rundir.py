"""A run directory as a small journal whose commit point is the checkpoint.

An epoch counts once its checkpoint is durable: written to ``checkpoint.part``, fsynced, renamed
over ``checkpoint.pt`` and the directory fsynced, so a kill, a Ctrl-C, a power cut or a full
disk leaves the old checkpoint or the new one, whole. ``metrics.jsonl`` and ``curves.png`` are
derived from the history the checkpoint holds and rewritten (atomically) after each commit and on
resume, so they never run ahead of it or repeat an epoch; ``placement.json`` is derived from the
configuration. A new run claims the directory first:
it must hold no committed run (stale ``.part`` files, and derived files without a checkpoint,
are leftovers of a run that committed nothing) unless the caller asks to overwrite, and it must be
writable, before any board is opened. In a distributed run only the writing rank calls this.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from cim_hil.errors import CimHilError, ConfigError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
PLACEMENT = "placement.json"
PARTIAL = ".part"
DERIVED = (METRICS, CURVES, PLACEMENT)


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def claim(self, overwrite: bool = False) -> None:
        """Make ``path`` this new run's: refuse a file, an unwritable place or an old run."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} is a file, not a directory")
        self._drop_partials()
        if self.path.is_dir() and not self.checkpoint.exists():
            for name in DERIVED:  # derived from a run that never committed an epoch: nothing to keep
                (self.path / name).unlink(missing_ok=True)
        if self.path.is_dir() and (held := sorted(p.name for p in self.path.iterdir())):
            if not overwrite:
                raise ConfigError(
                    f"run directory {self.path} is not empty (it holds {', '.join(held[:4])}"
                    f"{', ...' if len(held) > 4 else ''}); continue it with --resume, or start over with --overwrite"
                )
            for name in (CHECKPOINT, *DERIVED):
                (self.path / name).unlink(missing_ok=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f"write-test{PARTIAL}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"run directory {self.path} cannot be written: {error.strerror or error}") from None

    def commit(self, state: dict, epoch: int) -> Path:
        """Make ``state`` the run's checkpoint, durably; on failure the old one stays whole."""
        partial = self.checkpoint.with_suffix(PARTIAL)
        buffer = io.BytesIO()
        torch.save(state, buffer)  # in memory first: a failed write is then the OS's plain error
        try:
            with open(partial, "wb") as stream:
                stream.write(buffer.getbuffer())
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(partial, self.checkpoint)
            self._sync_directory()
        except OSError as error:
            partial.unlink(missing_ok=True)
            kept = f"it still holds epoch {epoch - 1}" if epoch > 1 else "no epoch is saved yet"
            raise CimHilError(
                f"cannot write the checkpoint of epoch {epoch} to {self.path}: {error.strerror or error}; {kept}"
            ) from None
        return self.checkpoint

    def load(self) -> dict:
        """The committed state (a ``.part`` a crash left behind is not part of the run)."""
        path = self.checkpoint
        if not path.is_file():
            raise CimHilError(f"no checkpoint to resume from at {path}")
        try:
            state = torch.load(path, weights_only=True)  # tensors and plain data only: a pickle runs no code
        except Exception as error:  # a damaged file is a user-facing problem, not a traceback
            raise CimHilError(f"checkpoint {path} cannot be read: {error}") from None
        if not isinstance(state, dict) or not {"config", "model", "epoch"} <= state.keys():
            raise CimHilError(f"{path} is not a cim-hil checkpoint (it holds a {type(state).__name__})")
        self._drop_partials()
        return state

    def write_metrics(self, history: list[dict]) -> None:
        """``metrics.jsonl`` rewritten from the committed history: one line per epoch, no more."""
        partial = self.path / (METRICS + PARTIAL)
        try:
            partial.write_text("".join(json.dumps(row) + "\n" for row in history))
            os.replace(partial, self.path / METRICS)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise CimHilError(f"cannot write {METRICS} in {self.path}: {error.strerror or error}; "
                              "the checkpoint holds the metrics, --resume rewrites them") from None

    def _sync_directory(self) -> None:
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _drop_partials(self) -> None:
        if self.path.is_dir():
            for leftover in self.path.glob(f"*{PARTIAL}"):
                leftover.unlink(missing_ok=True)
