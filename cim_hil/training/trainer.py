"""Train LeNet-5 on MNIST, on analog tiles with the mixed-precision updater or in float.

A run directory (:mod:`cim_hil.training.rundir`) holds ``checkpoint.pt``, committed durably
after every epoch, and ``metrics.jsonl`` (one line per epoch), ``curves.png`` and
``placement.json`` derived from it, so a pulled cable, a killed process or a full disk loses at
most the epoch in progress. ``Trainer.resume`` continues a run bit for bit: its configuration,
model, chi and optimizer state, emulated device state and every random stream are in the
checkpoint. Only the writing rank touches the directory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from tqdm import tqdm

from cim_hil.board import Board, open_board
from cim_hil.config import EmulatorConfig, LinkConfig, SoCConfig, Strict, validate
from cim_hil.errors import BoardError, CimHilError, ConfigError, UnsafeValueError
from cim_hil.nn import MappingConfig, analog_layers, convert_to_analog
from cim_hil.nn.placement import Placement, plan_for_board, plan_placement
from cim_hil.training.lenet import lenet5
from cim_hil.training.mnist import MNIST
from cim_hil.training.algorithms.build import Calibrate, build_optimizer
from cim_hil.training.algorithms.config import MIXED_PRECISION, TRANSFER, Algorithm, AlgorithmConfig
from cim_hil.training.distributed import World, check_ranks
from cim_hil.training.plots import plot_training_curves
from cim_hil.training.rundir import CHECKPOINT, CURVES, PLACEMENT, RunDirectory

# Raised whenever what a checkpoint's tensors mean changes. 2: convolution kernels flattened
# channels last (``AnalogConv2d``).
CHECKPOINT_FORMAT = 2
EVAL_BATCH = 500


class TrainConfig(Strict):
    board: str = Field("emulator:", description="board URL; the emulator gets as many tiles as the model needs")
    float_baseline: bool = Field(False, description="train in float32 on the host instead")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0.0, allow_inf_nan=False, description="3e-3: the mixed-precision updater needs updates that reach epsilon")
    rule: Literal["sgd", "adam"] = "adam"
    seed: int = Field(0, ge=0)
    train_limit: int | None = Field(None, ge=1, description="use only the first N training digits")
    test_limit: int | None = Field(None, ge=1, description="use only the first N test digits")
    pack: bool | None = Field(
        None, description="pack small blocks side by side on tiles; None: only when one block per tile does not fit"
    )
    host_layers: list[str] | Literal["auto"] = Field(
        [], description="layers kept digital on the host (module names, as `cim-hil plan` prints them); 'auto': the "
        "largest until the rest fits the board's tiles, packed"
    )
    link: LinkConfig | None = Field(
        None, description="for boards on a serial line: line rate and patience (default: LinkConfig's defaults)"
    )
    rank_boards: list[str] = Field(
        [], description="data-parallel: one board URL per rank; default: `board` with {rank} filled in, and for "
        "the emulator the seed plus the rank (another chip)"
    )
    distributed_timeout_s: float = Field(
        60.0, gt=0.0, le=86_400.0, allow_inf_nan=False,
        description="data-parallel: how long a rank waits for the others before it stops (at most a day)"
    )
    mapping: MappingConfig = Field(
        MappingConfig(differential=True),
        description="differential by default: each weight on a device and its reference device, 31 levels instead "
        "of 16 (within a point of float32 on LeNet); boards without reference devices need differential = false; "
        "the on-device algorithms default to open-loop pulses",
    )
    algorithm: Algorithm = Field("mp", description="mp, mp-no-accumulation (write-verify); sgd, ttv2, c-ttv2, agad "
                                 "(pulses on the devices)")
    algorithm_options: AlgorithmConfig = Field(AlgorithmConfig(), description="hyper-parameters of sgd and the "
                                               "transfer algorithms")

    @model_validator(mode="after")
    def _pulses_for_on_device_algorithms(self) -> "TrainConfig":
        if self.algorithm in MIXED_PRECISION or self.mapping.programming == "pulses":
            return self
        if self.mapping == MappingConfig(differential=True):  # the default: these algorithms need pulses
            object.__setattr__(self, "mapping", MappingConfig(programming="pulses"))
            return self
        raise ValueError(f"algorithm {self.algorithm} programs by pulses: set mapping.programming = 'pulses'")


class TrainingDiverged(CimHilError):
    """The weights or the loss stopped being finite: the learning rate is too high."""


def open_board_for(model: torch.nn.Module, url: str, pack: bool | None = None,
                   host_layers: list[str] | str = (), link: LinkConfig | None = None, copies: int = 1) -> Board:
    """Open ``url``; a bare emulator URL gets exactly the tiles the model needs (packed if
    ``pack``; with ``host_layers`` other than ``"auto"`` kept on the host), ``copies`` times
    (2: a fast array A beside every tile of C). ``link`` configures a board on a serial line."""
    bare_emulator = url == "emulator:" or url.startswith("emulator:?")
    if bare_emulator and "tiles=" not in url:
        default = EmulatorConfig()
        host = () if host_layers == "auto" else tuple(host_layers)
        needed = plan_placement(model, default.soc.rows, default.soc.cols, bool(pack), host).tiles_used
        return open_board(url, EmulatorConfig(soc=SoCConfig(tiles=copies * needed)))
    return open_board(url, link)


def _since(before: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """What a counter dict grew by between two readings."""
    return {name: now[name] - before[name] for name in before}


class Trainer:
    """One training run of LeNet-5 on ``data`` as ``config`` says, writing into ``out_dir``:
    the board it opens, the analog model and its mixed-precision optimizer (or the float
    baseline), the epochs done and their metrics. ``fit`` trains and checkpoints after every
    epoch; ``resume`` picks a run up from its checkpoint; a new run needs an empty ``out_dir`` (or
    ``overwrite=True``). ``progress`` shows a bar per epoch.
    ``world``: this process's place among data-parallel ranks (``cim_hil.training.distributed``);
    alone by default, where every collective is the identity. ``calibrate`` zero-shifts one tile
    (``calibration.calibrate_references``): what TTv2 and c-TTv2 need for A, and
    ``mapping.reference = "calibrated"`` for the model's tiles.
    """

    def __init__(self, config: TrainConfig, data: MNIST, out_dir: str | Path, progress: bool = True,
                 world: World | None = None, overwrite: bool = False, calibrate: Calibrate | None = None) -> None:
        if (world or World()).writer:
            RunDirectory(out_dir).claim(overwrite)  # before any board is opened or programmed
        self._build(config, data, out_dir, progress, world, calibrate)

    def _build(self, config: TrainConfig, data: MNIST, out_dir: str | Path, progress: bool,
               world: World | None, calibrate: Calibrate | None = None) -> None:
        self.run_dir = RunDirectory(out_dir)
        self.config = config
        self.world = world or World()
        if self.world.size > 1:
            check_ranks(config, self.world.size)  # before a board is opened
        self.data = MNIST(data.train.head(config.train_limit), data.test.head(config.test_limit), data.source)
        self.out_dir = Path(out_dir)
        self.progress = progress
        torch.manual_seed(config.seed)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        model = lenet5()
        self.placement: Placement | None = None
        if config.float_baseline:
            self.board = None
            self.model = model
            optimizer_type = torch.optim.Adam if config.rule == "adam" else torch.optim.SGD
            self.optimizer = optimizer_type(model.parameters(), lr=config.lr)
        else:
            copies = 2 if config.algorithm in TRANSFER else 1
            self.board = open_board_for(model, self.world.board_url(config), config.pack, config.host_layers,
                                        config.link, copies)
            try:
                self.placement = plan_for_board(model, self.board, config.pack, config.host_layers)
                if config.mapping.reference == "calibrated":
                    if calibrate is None:
                        raise ConfigError("mapping.reference = 'calibrated' needs a calibrate function "
                                          "(calibration.calibrate_references)")
                    for tile in self.board.tiles[: self.placement.tiles_used]:
                        calibrate(tile)
                self.model = convert_to_analog(model, self.board, config.mapping, self.placement)
                self.optimizer = build_optimizer(config.algorithm, self.model, self.board, config.lr, config.rule,
                                                 config.algorithm_options, config.seed, calibrate, self.world.agree)
            except BaseException:
                self.board.close()
                raise
        # Every rank starts from rank 0's host copies (its devices were programmed to the same targets).
        self.world.broadcast_(list(self.model.state_dict().values()))
        self.epoch = 0
        self.history: list[dict] = []

    # ---- the loop -------------------------------------------------------------------------
    def print_placement(self) -> None:
        """Say on stderr where the layers sit, before any epoch (the writing rank alone)."""
        if self.placement is not None and self.world.writer:
            print(f"placement: {self.placement.summary()} (in {self.out_dir / PLACEMENT})", file=sys.stderr)

    def fit(self, epochs: int | None = None) -> list[dict]:
        """Train up to ``epochs`` (default: the config's) epochs in total, resuming where left."""
        if self.placement is not None and self.world.writer:  # known before any epoch, and shown to users
            (self.out_dir / PLACEMENT).write_text(json.dumps(self.placement.as_dict(), indent=2))
        for _ in range(self.epoch, epochs or self.config.epochs):
            try:
                row = self._train_epoch()
            except BoardError as error:
                saved = f"the checkpoint in {self.out_dir} holds epoch {self.epoch}" if self.epoch else "no epoch finished yet"
                raise BoardError(f"{error}. Training stopped in epoch {self.epoch + 1}; {saved}; resume with --resume") from None
            row.update(self.evaluate())
            self.epoch += 1
            self.history.append(row)
            self.save_checkpoint()  # the commit point: what follows is derived from it
            self._write_derived()
        return self.history

    def _train_epoch(self) -> dict:
        train, size = self.data.train, self.config.batch_size
        order = self.world.shard(torch.randperm(len(train), generator=self.shuffle))  # every rank draws the same
        self.model.train()
        before = self.board.counters if self.board else None
        traffic = self.board.link_traffic() if self.board else {}
        programmed, loss_sum, correct = 0, 0.0, 0
        start = time.perf_counter()
        bar = self._bar(len(order), f"epoch {self.epoch + 1}/{self.config.epochs}")
        for step, first in enumerate(range(0, len(order), size), 1):
            chosen = order[first : first + size]
            images, labels = train.images[chosen], train.labels[chosen]
            self.optimizer.zero_grad()
            try:
                logits = self.model(images)
            except UnsafeValueError:  # a NaN or inf reached an analog layer's inputs
                self._check_diverged(step)
                raise
            loss = F.cross_entropy(logits, labels)
            if not math.isfinite(loss.item()):
                self._check_diverged(step, loss.item())
            loss.backward()
            self.world.average_gradients(list(self.model.parameters()))
            self.optimizer.step()
            loss_sum += loss.item() * len(chosen)
            correct += int((logits.argmax(1) == labels).sum())
            if self.board is not None:
                programmed += self.optimizer.last_step["devices_programmed"]
            bar.update(len(chosen))
            bar.set_postfix(loss=f"{loss.item():.3f}", **self._link_rate(traffic, start))
        bar.close()
        seconds = time.perf_counter() - start
        seen, loss_sum, correct = self.world.total([len(order), loss_sum, correct])  # over every rank's shard
        row = {
            "epoch": self.epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "train_seconds": seconds,
            "host_threads": torch.get_num_threads(),  # the host compute's share of the CPU in that time
        }
        if self.world.size > 1:
            row.update(ranks=self.world.size, train_samples=int(seen))
        if self.board is not None:
            spent = self.board.counters
            # Summed over the ranks' boards (devices programmed: every rank programs the same weights).
            pulses, chip_seconds, energy_nj = self.world.total(
                [spent.pulses - before.pulses, spent.seconds - before.seconds, spent.energy_nj - before.energy_nj])
            row.update(
                devices_programmed=programmed,
                pulses=int(pulses),
                chip_seconds=chip_seconds,
                chip_energy_uj=energy_nj / 1000,
                **self._traffic_since(traffic),
                **self.optimizer.write_statistics(),
            )
        return row

    def _check_diverged(self, step: int, loss: float | None = None) -> None:
        """Raise :class:`TrainingDiverged` naming the step when the weights (or the loss) are no
        longer finite; the checkpoint still holds the last epoch that ended well."""
        broken = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if loss is None and not broken:
            return
        what = f"the loss is {loss}" if loss is not None else f"{', '.join(broken[:3])} became NaN or infinite"
        raise TrainingDiverged(
            f"training diverged in epoch {self.epoch + 1} at step {step} (batch size {self.config.batch_size}, "
            f"lr {self.config.lr}): {what}; lower the learning rate"
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test accuracy; on a board also the chip's and the link's share of the pass (``test_``
        beside the training pass's names)."""
        self.model.eval()
        test = self.data.test
        before = self.board.counters if self.board else None
        traffic = self.board.link_traffic() if self.board else {}
        start = time.perf_counter()
        mine = torch.arange(len(test))[self.world.rank :: self.world.size]  # each rank tests its share on its chip
        correct = 0
        bar = self._bar(len(mine), "test")
        for first in range(0, len(mine), EVAL_BATCH):
            chosen = mine[first : first + EVAL_BATCH]
            logits = self.model(test.images[chosen])
            correct += int((logits.argmax(1) == test.labels[chosen]).sum())
            bar.update(len(chosen))
            bar.set_postfix(self._link_rate(traffic, start))
        bar.close()
        (correct,) = self.world.total([correct])
        row = {"test_acc": correct / len(test)}
        if self.board is not None:
            (row["test_chip_seconds"],) = self.world.total([self.board.counters.seconds - before.seconds])
            row.update({f"test_{name}": value for name, value in self._traffic_since(traffic).items()})
        return row

    def _traffic_since(self, traffic: dict[str, float]) -> dict[str, float]:
        """The link traffic since ``traffic`` was read, summed over the ranks' boards."""
        moved = _since(traffic, self.board.link_traffic())
        return dict(zip(moved, self.world.total(list(moved.values()))))

    def _bar(self, digits: int, what: str) -> tqdm:
        """Progress in digits, its rate and ETA averaged over the whole pass (smoothing 0): on a
        slow link every step takes long, and a recent-steps average would swing with each one."""
        return tqdm(total=digits, unit="digit", desc=what, smoothing=0, disable=not self.progress, leave=False)

    def _link_rate(self, traffic: dict[str, float], start: float) -> dict[str, str]:
        """This rank's link throughput since ``start`` (bytes both ways per second), for a bar's postfix."""
        if not traffic:
            return {}
        moved = _since(traffic, self.board.link_traffic())
        rate = (moved["link_bytes_out"] + moved["link_bytes_in"]) / max(time.perf_counter() - start, 1e-9)
        return {"link": tqdm.format_sizeof(rate, "B/s")}

    def _title(self) -> str:
        kind = "float32 baseline" if self.config.float_baseline else f"mixed precision on {self.config.board}"
        return f"LeNet-5 / MNIST, {kind}"

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes it (every rank takes part: each rank's emulated board state goes in)."""
        boards = self.world.gather(self.board.state_dict() if self.board else None)
        if not self.world.writer:
            return None
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.model_dump(),
            "epoch": self.epoch,
            "history": self.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "board": boards[0],
            "rank_boards": boards,
            "shuffle": self.shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
            "data_source": self.data.source,
        }
        return self.run_dir.commit(state, self.epoch)

    def _write_derived(self) -> None:
        if not self.world.writer:
            return
        self.run_dir.write_metrics(self.history)
        plot_training_curves(self.history, self.out_dir / CURVES, self._title())

    @staticmethod
    def read_checkpoint(out_dir: str | Path) -> dict:
        """The committed state of the run in ``out_dir``, checked to be one this version reads."""
        state = RunDirectory(out_dir).load()
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CimHilError(f"checkpoint {Path(out_dir) / CHECKPOINT} was written by another version of cim-hil "
                              f"(format {state.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}); start a new run")
        return state

    @classmethod
    def resume(cls, out_dir: str | Path, data: MNIST, progress: bool = True, world: World | None = None,
               state: dict | None = None, calibrate: Calibrate | None = None) -> "Trainer":
        """Continue the run in ``out_dir`` with the configuration its checkpoint holds;
        ``calibrate`` as for a new run, used only on hardware whose state the checkpoint does
        not hold (an emulator's state comes back whole, calibrated references with it)."""
        state = state if state is not None else cls.read_checkpoint(out_dir)
        path = Path(out_dir) / CHECKPOINT
        if state.get("data_source", data.source) != data.source:
            raise ConfigError(f"the run in {out_dir} trained on {state['data_source']}, not on {data.source}; "
                              "give it the same --data-dir")
        world = world or World()
        boards = state.get("rank_boards", [state["board"]])
        if len(boards) != world.size:
            raise CimHilError(f"checkpoint {path} was written by {len(boards)} rank(s); resume it with as many, "
                              f"not {world.size}")
        restored = all(board is not None for board in boards)
        trainer = cls.__new__(cls)  # the directory is this run's already: no claim
        trainer._build(validate(TrainConfig, state["config"]), data, out_dir, progress, world,
                       (lambda tile: None) if restored else calibrate)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.board is not None:
            board = boards[world.rank]
            if board is None:  # real hardware: its devices may have moved, write them again
                for layer in analog_layers(trainer.model):
                    layer.rewrite_devices()
            trainer.board.load_state_dict(board)
        trainer.shuffle.set_state(state["shuffle"])
        torch.set_rng_state(state["torch_rng"])
        trainer.epoch, trainer.history = state["epoch"], state["history"]
        trainer._write_derived()  # a crash after the last commit may have left them behind it
        return trainer
