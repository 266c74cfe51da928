"""``cim-hil train``: its arguments and its handler, beside the trainer they drive."""

from __future__ import annotations

import argparse
import json
import sys


def register(commands: argparse._SubParsersAction, calibrate=None) -> None:
    """``calibrate``: zero-shifts one tile, for the algorithms and mappings that need it (the
    top layer hands in the calibration package's)."""
    train = commands.add_parser("train", help="train LeNet-5 on MNIST on the emulator (or a board)")
    train.add_argument("--board", help="board URL (default: the emulator with as many tiles as LeNet needs)")
    train.add_argument("--float", dest="float_baseline", action="store_true", help="float32 baseline on the host")
    train.add_argument("--epochs", type=int, help="train up to this many epochs in total (default 3)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--rule", choices=["sgd", "adam"])
    train.add_argument("--algorithm", choices=["mp", "mp-no-accumulation", "sgd", "ttv2", "c-ttv2", "agad"],
                       help="mixed precision (default), without accumulation, or training on the devices: analog "
                       "SGD by pulses, Tiki-Taka v2, chopped TTv2, AGAD")
    train.add_argument("--seed", type=int)
    train.add_argument("--train-limit", type=int, help="use only the first N training digits")
    train.add_argument("--test-limit", type=int, help="use only the first N test digits")
    train.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                       help="pack small blocks side by side on tiles (default: only when needed to fit the board)")
    train.add_argument("--host-layers", help="comma-separated layers to keep on the host (see cim-hil plan), or "
                       "'auto': the largest until the rest fits the board")
    train.add_argument("--nproc", type=int, help="data-parallel: spawn N ranks, each on its own board (torch.distributed)")
    train.add_argument("--rank-boards", nargs="+", metavar="URL", help="data-parallel: one board URL per rank")
    train.add_argument("--distributed-timeout", type=float, metavar="S",
                       help="data-parallel: seconds a rank waits for the others before it stops (default 60)")
    train.add_argument("--config", help="TOML/JSON file with TrainConfig fields (flags override it)")
    train.add_argument("--data-dir", help="directory with the MNIST IDX files (default: offline data)")
    train.add_argument("--download", action="store_true", help="download the IDX files into --data-dir")
    train.add_argument("--out", default="runs/lenet", help="run directory: metrics, curves, checkpoint")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out with the configuration its checkpoint holds")
    train.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=run_train, calibrate=calibrate)


def _train_data_parallel(args: argparse.Namespace, config, data, progress: bool, world, state) -> None:
    """``--nproc N`` spawns N ranks here; under torchrun this process is one of them (``world``)."""
    from cim_hil.training.distributed import run_rank, spawn_ranks

    if world is not None:
        summary = run_rank(world, config, data, args.out, progress, state, args.epochs, args.overwrite)
        if world.rank != 0:
            return
    else:
        summary = spawn_ranks(config, data, args.out, args.nproc, progress, state, args.epochs, args.overwrite)
    print(json.dumps(summary, indent=2))


def run_train(args: argparse.Namespace) -> None:
    """Train LeNet-5 on MNIST (mixed precision on the emulator by default); resume with --resume.
    Under torchrun each process first joins the group, so that rank 0 alone reads a checkpoint
    to resume from: other hosts need not see its run directory."""
    import torch.distributed as dist

    from cim_hil.config import load_config, validate
    from cim_hil.training import TrainConfig
    from cim_hil.training.distributed import join_group, stopped_by_sigterm, under_torchrun

    base = load_config(args.config, TrainConfig).model_dump() if args.config else {}
    flags = {
        "board": args.board,
        "float_baseline": args.float_baseline or None,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rule": args.rule,
        "algorithm": args.algorithm,
        "seed": args.seed,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "pack": args.pack,
        "rank_boards": args.rank_boards,
        "distributed_timeout_s": args.distributed_timeout,
        "host_layers": None if args.host_layers is None else (
            "auto" if args.host_layers == "auto" else [name for name in args.host_layers.split(",") if name]),
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if not under_torchrun():
        _train(args, base, given, None)
        return
    # A resumed run's timeout is not known before its checkpoint is: the group waits the flag's (or
    # the config file's, or the default), and so does the resumed run (``_train``).
    patience = validate(TrainConfig, {"distributed_timeout_s": _patience({**base, **given})}).distributed_timeout_s
    world = join_group(0, 0, None, patience)
    try:
        with stopped_by_sigterm():
            _train(args, base, given, world)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, base: dict, given: dict, world) -> None:
    """One process's run: alone, the parent of ``--nproc`` ranks, or one torchrun rank (``world``)."""
    from cim_hil.config import validate
    from cim_hil.errors import ConfigError
    from cim_hil.training import TrainConfig, Trainer
    from cim_hil.training.distributed import checkpoint_from_rank_0
    from cim_hil.training.mnist import load_mnist
    from cim_hil.training.rundir import RunDirectory

    progress = not args.no_progress
    if args.resume:
        if args.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite starts a new one: give one of them")
        if world is None:
            state = Trainer.read_checkpoint(args.out)
        else:
            state = checkpoint_from_rank_0(world, lambda: Trainer.read_checkpoint(args.out))
        asked = {**base, **given}
        _refuse_conflicts(state["config"], asked, args.out)
        if "distributed_timeout_s" in asked or world is not None:  # more patience, or the group's
            state["config"] = {**state["config"], "distributed_timeout_s": _patience(asked)}
        config = validate(TrainConfig, state["config"])
    else:
        state, config = None, validate(TrainConfig, {**base, **given})
    _check_data_parallel(args.nproc, config, world)
    if state is None and (world is None or world.writer):  # the writing rank claims the directory,
        RunDirectory(args.out).claim(args.overwrite)  # before the data is read or a board opened
    data = load_mnist(args.data_dir, download_missing=args.download, seed=config.seed)
    print(f"data: {data.source}", file=sys.stderr)
    if args.nproc is not None or world is not None:
        _train_data_parallel(args, config, data, progress, world, state)
        return
    if state is not None:
        trainer = Trainer.resume(args.out, data, progress, state=state, calibrate=args.calibrate)
        print(f"resuming {args.out} after epoch {trainer.epoch}", file=sys.stderr)
    else:
        trainer = Trainer(config, data, args.out, progress, overwrite=args.overwrite, calibrate=args.calibrate)
    trainer.print_placement()
    history = trainer.fit(args.epochs)
    summary = {"out": str(args.out), "epochs": trainer.epoch, **(history[-1] if history else {})}
    if trainer.board is not None:
        summary["board"] = trainer.board.info()
    print(json.dumps(summary, indent=2))


def _patience(asked: dict) -> float:
    """The data-parallel timeout the flags or config file ask for, else the default."""
    from cim_hil.training import TrainConfig

    return asked.get("distributed_timeout_s", TrainConfig.model_fields["distributed_timeout_s"].default)


def _check_data_parallel(nproc: int | None, config, world) -> None:
    """Refuse a data-parallel request that cannot run, before a directory is claimed or a rank
    spawned (each rank would otherwise say it again)."""
    from cim_hil.errors import ConfigError
    from cim_hil.training.distributed import check_ranks

    if world is not None:
        if nproc is not None and nproc != world.size:
            raise ConfigError(f"--nproc {nproc} under torchrun, which started {world.size} rank(s): torchrun sets "
                              "the ranks (--nproc-per-node), leave out --nproc")
        check_ranks(config, world.size)
    elif nproc is not None:
        check_ranks(config, nproc)
    elif config.rank_boards:
        raise ConfigError("rank_boards (--rank-boards) names one board per data-parallel rank: give --nproc N "
                          "as well, or run under torchrun; one process trains on --board")


# A resumed run may be given more epochs or more patience; everything else is the run's own.
RESUMABLE = {"epochs", "distributed_timeout_s"}


def _refuse_conflicts(saved: dict, asked: dict, out: str) -> None:
    """A flag (or --config field) that disagrees with the checkpoint's configuration is refused."""
    from cim_hil.errors import ConfigError

    for field, value in asked.items():
        if field in RESUMABLE or field not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[field], dict):
            _refuse_conflicts(saved[field], value, out)
        elif value != saved[field]:
            flag = "--float" if field == "float_baseline" else "--" + field.replace("_", "-")
            raise ConfigError(
                f"{flag} {value} conflicts with the run in {out}, which has {field} = {saved[field]}; a resumed run "
                f"keeps its configuration (start a new run with --overwrite or another --out to change it)"
            )
