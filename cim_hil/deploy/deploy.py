"""Deploy a trained model onto fresh chips: program, evaluate, calibrate, evaluate again.

Each chip is a new draw of device-to-device variation. On the emulator that is a new seed
(chip k of a run gets ``first_seed + k``, recorded in the results); a serial board is one chip
per URL. Programming is write-verify of every weight (the chip-trained model to exactly the
levels it was trained on); its time and energy are the board's timing model's. Test accuracy
is measured before and after post-training calibration (:mod:`cim_hil.deploy.calibrate`), and
optionally again after the chip has waited idle (``Board.let_time_pass``: its conductances
relax, on the emulator by its relaxation model); the results, with each chip's calibrated
constants, are saved as JSON beside a histogram PNG.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import torch
from pydantic import Field, PositiveFloat
from torch import nn
from tqdm import tqdm

from cim_hil.board import Board, open_board
from cim_hil.config import EmulatorConfig, SoCConfig, Strict
from cim_hil.deploy.calibrate import (
    Calibration,
    calibrate_adc_ranges,
    calibrate_columns,
    calibrate_input_ranges,
    named_analog_layers,
)
from cim_hil.deploy.checkpoint import TrainedModel, _mapped_layers
from cim_hil.errors import CimHilError
from cim_hil.nn import MappingConfig, convert_to_analog, count_tiles
from cim_hil.tile import Capability
from cim_hil.training.mnist import MNIST, Split

RESULTS = "deployment.json"
HISTOGRAM = "accuracy_histogram.png"
EVAL_BATCH = 500


class DeployConfig(Strict):
    chips: int = Field(10, ge=1, description="emulator chips to draw (a serial board is one chip per URL)")
    first_seed: int = Field(1000, ge=0, description="emulator chip k gets seed first_seed + k (the training chip: 0)")
    calibrate_columns: bool = Field(True, description="scale each column to the full conductance range")
    calibrate_inputs: bool = Field(True, description="a fixed DAC input range per layer from activation statistics")
    calibrate_adc: bool = Field(True, description="an ADC full scale per layer's tiles from a search on the chip")
    calibration_images: int = Field(128, ge=1, description="training-split digits the input and ADC calibration see")
    test_limit: int | None = Field(None, ge=1, description="evaluate on the first N test digits only")
    relax_after_s: tuple[PositiveFloat, ...] = Field(
        (), description="evaluate each chip again this many seconds after it was programmed and calibrated"
    )

    @property
    def calibrates(self) -> bool:
        return self.calibrate_columns or self.calibrate_inputs or self.calibrate_adc


def chip_urls(urls: list[str], config: DeployConfig) -> list[tuple[str, int | None]]:
    """Every chip to deploy to, with its seed: an emulator URL gives ``chips`` seeds (its own
    ``seed=`` is replaced), any other URL is one chip whose seed is not ours to know."""
    chips = []
    for url in urls:
        if not url.startswith("emulator:"):
            chips.append((url, None))
            continue
        base, _, query = url.partition("?")
        options = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "seed"]
        for index in range(config.chips):
            seed = config.first_seed + index
            chips.append((f"{base}?{urlencode([*options, ('seed', seed)])}", seed))
    return chips


def _open_chip(url: str, model: nn.Module) -> Board:
    """Open a chip; an emulator URL without ``tiles=`` gets exactly the tiles the model needs."""
    if url.startswith("emulator:") and "tiles=" not in url.partition("?")[2]:
        default = EmulatorConfig()
        return open_board(url, EmulatorConfig(soc=SoCConfig(tiles=count_tiles(model, default.soc.rows, default.soc.cols))))
    return open_board(url)


def analog_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mapped layers' weights in the analog layers' layout (kernels flattened channels last)."""
    weights = {}
    for name, module in _mapped_layers(model):
        w = module.weight.detach()
        weights[name] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if isinstance(module, nn.Conv2d) else w
    return weights


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    model.eval()
    correct = 0
    for first in range(0, len(split), EVAL_BATCH):
        logits = model(split.images[first : first + EVAL_BATCH])
        correct += int((logits.argmax(1) == split.labels[first : first + EVAL_BATCH]).sum())
    return correct / len(split)


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values),
            "max": max(values)}


class Deployment:
    """Deploys one trained model onto chips, one after the other."""

    def __init__(self, trained: TrainedModel, data: MNIST, config: DeployConfig | None = None) -> None:
        self.trained = trained
        self.config = config or DeployConfig()
        self.test = data.test.head(self.config.test_limit)
        self.calibration_images = data.train.images[: self.config.calibration_images]
        self.weights = analog_weights(trained.model)

    def _configs(self, board: Board) -> dict[str, MappingConfig]:
        spec = board[0].spec
        top = spec.levels - 1
        reach = top if self.trained.mapping.differential else top // 2
        configs = {}
        for name, levels in self.trained.levels.items():
            largest = int(levels.abs().max())
            if 0 < largest <= reach:
                configs[name] = self.trained.mapping.model_copy(update={"weight_fill": largest / reach})
        return configs

    def _check_fits(self, board: Board, url: str) -> None:
        spec = board[0].spec
        needed = count_tiles(self.trained.model, spec.rows, spec.cols)
        if needed > len(board):
            raise CimHilError(f"the chip at {url} is too small: the model needs {needed} tiles of "
                              f"{spec.rows}x{spec.cols}, it has {len(board)}")
        if self.trained.levels and spec.levels - 1 < max(int(v.abs().max()) for v in self.trained.levels.values()):
            raise CimHilError(f"the chip at {url} has {spec.levels} levels per device, fewer than the model was "
                              "trained on")
        if self.config.calibrate_adc and not spec.supports(Capability.ADC_RANGE):
            raise CimHilError(f"the chip at {url} cannot set its ADC range (no '{Capability.ADC_RANGE}' capability); "
                              "deploy with --no-adc-calibration")
        if self.config.relax_after_s and not board.can_let_time_pass:
            raise CimHilError(f"the chip at {url} cannot let time pass, so it cannot be evaluated after relaxation; "
                              "deploy without --relax")

    def run_chip(self, url: str, seed: int | None) -> dict:
        """Program, evaluate, calibrate and evaluate one chip; returns its row of results."""
        with _open_chip(url, self.trained.model) as board:
            self._check_fits(board, url)
            before, start = board.counters, time.perf_counter()
            analog = convert_to_analog(self.trained.model, board, self.trained.mapping,
                                       layer_configs=self._configs(board))
            programmed = board.counters
            row = {
                "url": url,
                "seed": seed,
                "write_verify_failures": self._failures(analog),
                "programming_chip_seconds": programmed.seconds - before.seconds,
                "programming_energy_uj": (programmed.energy_nj - before.energy_nj) / 1000,
                "programming_pulses": programmed.pulses - before.pulses,
                "accuracy": accuracy(analog, self.test),
            }
            constants, config = Calibration(), self.config
            if config.calibrate_columns:
                constants.column_gains = calibrate_columns(analog, self.weights)
                if config.calibrate_inputs or config.calibrate_adc:  # what the columns alone recover
                    row["columns_accuracy"] = accuracy(analog, self.test)
            if config.calibrate_inputs:
                constants.input_ranges = calibrate_input_ranges(analog, self.calibration_images)
                if config.calibrate_adc:  # what the steps before the ADC's recover
                    row["inputs_accuracy"] = accuracy(analog, self.test)
            if config.calibrate_adc:
                constants.adc_ranges = calibrate_adc_ranges(analog, self.calibration_images)
            if self.config.calibrates:
                row["calibrated_accuracy"] = accuracy(analog, self.test)
                row["calibration"] = constants.as_dict()
            if config.relax_after_s:
                row["relaxed"] = self._relaxed(board, analog)
            row["host_seconds"] = time.perf_counter() - start
        return row

    def _relaxed(self, board: Board, analog: nn.Module) -> list[dict]:
        """The chip as deployed (calibrated, if it was), evaluated at each time after it was
        programmed: one wait from each time to the next."""
        rows, waited = [], 0.0
        for seconds in sorted(set(self.config.relax_after_s)):
            board.let_time_pass(seconds - waited)
            waited = seconds
            rows.append({"seconds": seconds, "accuracy": accuracy(analog, self.test)})
        return rows

    def _failures(self, analog: nn.Module) -> int:
        """Weights whose level read back after write-verify is not the level asked for."""
        failures = 0
        for name, layer in named_analog_layers(analog):
            failures += int((layer.levels != layer.mapping.levels_for(self.weights[name])).sum())
        return failures

    def run(self, urls: list[str], progress: bool = True) -> dict:
        chips = chip_urls(urls, self.config)
        rows = [self.run_chip(url, seed) for url, seed in tqdm(chips, desc="chips", disable=not progress, leave=False)]
        return self.report(rows)

    def report(self, rows: list[dict]) -> dict:
        trained = self.trained
        reference = trained.reference_accuracy
        if not trained.chip_trained:  # a float model's own accuracy is the host's, on this test set
            reference = accuracy(trained.model, self.test)
        plain = [row["accuracy"] for row in rows]
        report = {
            "checkpoint": trained.source,
            "chip_trained": trained.chip_trained,
            "reference_accuracy": reference,
            "reference": "its training chip" if trained.chip_trained else "the host, float32",
            "test_digits": len(self.test),
            "config": self.config.model_dump(),
            "accuracy": _summary(plain),
            "drop_points": None if reference is None else 100 * (reference - statistics.fmean(plain)),
            "write_verify_failures": _summary([row["write_verify_failures"] for row in rows]),
            "programming_chip_seconds": _summary([row["programming_chip_seconds"] for row in rows]),
            "programming_energy_uj": _summary([row["programming_energy_uj"] for row in rows]),
            "host_seconds_per_chip": statistics.fmean(row["host_seconds"] for row in rows),
            "chips": rows,
        }
        if self.config.calibrates:
            calibrated = [row["calibrated_accuracy"] for row in rows]
            report["calibrated_accuracy"] = _summary(calibrated)
            for step in ("columns_accuracy", "inputs_accuracy"):
                if step in rows[0]:
                    report[step] = _summary([row[step] for row in rows])
            if reference is not None:
                report["calibrated_drop_points"] = 100 * (reference - statistics.fmean(calibrated))
                drop = reference - statistics.fmean(plain)
                report["drop_recovered"] = (statistics.fmean(calibrated) - statistics.fmean(plain)) / drop if drop > 0 else None
        if self.config.relax_after_s:
            times = [after["seconds"] for after in rows[0]["relaxed"]]
            report["relaxed_accuracy"] = [
                {"seconds": seconds, **_summary([row["relaxed"][index]["accuracy"] for row in rows])}
                for index, seconds in enumerate(times)
            ]
        return report


def deploy(
    trained: TrainedModel, data: MNIST, boards: str | list[str] = "emulator:", config: DeployConfig | None = None,
    out_dir: str | Path | None = None, progress: bool = True,
) -> dict:
    """Deploy ``trained`` onto the chips ``boards`` names (see :func:`chip_urls`); with
    ``out_dir``, save the results (JSON) and the accuracy histogram (PNG) there."""
    urls = [boards] if isinstance(boards, str) else list(boards)
    report = Deployment(trained, data, config).run(urls, progress)
    if out_dir is not None:
        save(report, Path(out_dir))
    return report


def save(report: dict, out_dir: Path) -> list[Path]:
    from cim_hil.deploy.plots import plot_accuracy_histogram

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, path)
    return [path, plot_accuracy_histogram(report, out_dir / HISTOGRAM)]


def load_calibration(row: dict) -> Calibration:
    """One chip's calibrated constants from its row of saved results."""
    return Calibration.from_dict(row.get("calibration", {}))
