"""Data-parallel training on torch.distributed: one process per board, gradients all-reduced.

Every rank drives its own board (another emulated chip, with its own seed, or its own serial
board) and trains on its shard of each epoch's shuffled digits. Gradients are averaged with one
all-reduce per step, so every rank's optimizer computes the same update; what the devices took
is agreed on too (``agree``), so chi, the rule's state and the host's weights stay the same on
every rank while each programs its own devices. Rank 0 writes the metrics and the checkpoint
(every rank's emulated device state in it).

Backends: NCCL when CUDA gives each rank on a host a GPU of its own, else gloo. ``cim-hil train
--nproc N`` spawns the ranks around a rendezvous store the parent holds, so the store outlives
any rank; under ``torchrun`` each process joins through the environment, and rank 0 hands the
checkpoint to resume to the others. A rank whose board fails writes what failed into the store
and leaves; the others' next collective fails when its connections close (or, if it hangs
instead, after ``distributed_timeout_s``), and each raises a ``BoardError`` naming that rank's
board. No rank waits longer than the timeout: a spawned rank that has not stopped a timeout
after another's error is killed, and torchrun ends its ranks itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl, urlencode

import torch
import torch.distributed as dist

from cim_hil.emulator.board import config_from_url
from cim_hil.errors import BoardError, CimHilError, ConfigError
from cim_hil.training.algorithms.config import MIXED_PRECISION

FAILURE_KEY = "cim-hil/failure"
REPORT_WAIT_S = 5.0  # how long a rank waits for a failed peer's report once the peer is gone


class World:
    """One process alone: every collective is the identity. The trainer runs through this
    interface, so a single process and rank 0 of many take the same code path."""

    rank, size = 0, 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory."""
        return self.rank == 0

    def board_url(self, config: Any) -> str:
        return config.board

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        return order

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Nothing to average alone."""

    def total(self, values: list[float]) -> list[float]:
        return values

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Nothing to copy alone."""

    def gather(self, value: Any) -> list[Any]:
        return [value]

    agree = None  # the optimizer records what this process's devices took


class ProcessGroupWorld(World):
    """This process as rank ``rank`` of ``size`` in the default process group."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.url = "?"

    def board_url(self, config: Any) -> str:
        """Rank r's board: ``rank_boards[r]``, else ``board`` with ``{rank}`` filled in; an
        emulator gets seed + r, another chip."""
        if config.rank_boards:  # one per rank (``check_ranks``)
            url = config.rank_boards[self.rank]
        else:
            url = config.board.replace("{rank}", str(self.rank))
        if url.startswith("emulator:"):
            url = _emulator_seeded(url, self.rank)
        self.url = url
        return url

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """Every size-th sample from this rank's position, cut so every rank takes as many steps."""
        share = len(order) // self.size
        return order[self.rank :: self.size][:share]

    def _reduce(self, flat: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        moved = flat.to(self.device)
        dist.all_reduce(moved, op=op)
        return moved.to(flat.device)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """One all-reduce of every gradient end to end, divided by the ranks."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = self._reduce(torch.cat([g.reshape(-1) for g in grads])).div_(self.size)
        for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(piece.view_as(grad))

    def total(self, values: list[float]) -> list[float]:
        return self._reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's ``tensors``, in place."""
        for tensor in tensors:
            moved = tensor.to(self.device)
            dist.broadcast(moved, 0)
            tensor.copy_(moved)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object) on rank 0; None elsewhere."""
        gathered = [None] * self.size if self.rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def agree(self, change: torch.Tensor) -> torch.Tensor:
        """The change every rank's devices took: the smallest where all moved the same way,
        else none; what a rank's device took beyond it stays in chi, and write-verify to the
        absolute level brings that device back in line on its next write."""
        both = self._reduce(torch.stack([change, -change]).to(torch.int64), op=dist.ReduceOp.MIN)
        least_up, least_down = both[0], -both[1]
        agreed = torch.where(least_up > 0, least_up, torch.where(least_down < 0, least_down, 0))
        return agreed.to(change.dtype)

    # ---- failures -----------------------------------------------------------------------
    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks what failed here, before this rank leaves."""
        report = {"rank": self.rank, "board": self.url, "error": str(error)}
        try:  # the first report stands: a rank stopping at the same time does not overwrite it
            dist.distributed_c10d._get_default_store().compare_set(FAILURE_KEY, "", json.dumps(report))
        except Exception:  # the store may be gone as well; the others then report a lost rank
            pass

    def failure_elsewhere(self, error: BaseException, timeout_s: float) -> BoardError:
        """What to raise when a collective failed because another rank left or hung."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.wait([FAILURE_KEY], timedelta(seconds=REPORT_WAIT_S))
            report = json.loads(store.get(FAILURE_KEY))
        except Exception:
            return BoardError(f"rank {self.rank} (board {self.url}) stopped: another rank left or did not answer "
                              f"within {timeout_s:g} s without saying why ({str(error).splitlines()[0]})")
        return BoardError(f"rank {self.rank} (board {self.url}) stopped because rank {report['rank']}'s board "
                          f"{report['board']} failed: {report['error']}")


class RankStopped(CimHilError):
    """torchrun's SIGTERM, sent to every rank once one has ended, as an error where it lands."""


@contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """Under torchrun: a SIGTERM raises ``RankStopped`` wherever this rank is (a rank on its
    own link can take a second to reach the collective that would tell it a peer has gone), so
    it can still say whose board failed. Once it is stopping with an error, SIGTERM is ignored
    until it has said so and exited; torchrun kills it after its grace period if it does not."""
    def stop(signum, frame):
        raise RankStopped("torchrun stopped this rank (SIGTERM): another rank has ended")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    signal.signal(signal.SIGTERM, previous)


def _emulator_seeded(url: str, rank: int) -> str:
    """``url`` with its seed (the URL's, else its config file's, else the default) plus ``rank``."""
    head, _, query = url.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    options["seed"] = str(config_from_url(url).seed + rank)
    return f"{head}?{urlencode(options)}"


def backend(local_ranks: int) -> str:
    """NCCL when CUDA gives every rank on this host a GPU of its own (NCCL refuses two ranks on
    one GPU), else gloo."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks else "gloo"


def join_group(rank: int, size: int, store: dist.Store | None, timeout_s: float) -> ProcessGroupWorld:
    """Join the default process group (from ``store``, or torchrun's environment when None)."""
    name = backend(size if store is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = torch.device("cpu")
    if name == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        dist.init_process_group(name, timeout=timeout)
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        dist.init_process_group(name, store=store, rank=rank, world_size=size, timeout=timeout)
    return ProcessGroupWorld(rank, size, device)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def check_ranks(config: Any, ranks: int) -> None:
    """What a data-parallel run on ``ranks`` ranks needs of ``config``, checked before any
    board is opened: a board per rank where they are named, and mixed precision."""
    if ranks < 1:
        raise ConfigError(f"--nproc must be at least 1, got {ranks}")
    if config.rank_boards and len(config.rank_boards) != ranks:
        raise ConfigError(f"rank_boards (--rank-boards) names {len(config.rank_boards)} board(s) for {ranks} ranks: "
                          "give one per rank")
    if ranks > 1 and config.algorithm not in MIXED_PRECISION:
        raise ConfigError(f"data-parallel ranks train with mixed precision only (--algorithm mp or "
                          f"mp-no-accumulation), not {config.algorithm}")


def checkpoint_from_rank_0(world: ProcessGroupWorld, read: Callable[[], dict]) -> dict:
    """Rank 0's ``read()`` (the checkpoint to resume) on every rank: on several hosts only rank
    0's need hold the run directory. What rank 0 could not read is raised on every rank."""
    box: list[Any] = [None]
    failed = None
    if world.rank == 0:
        try:
            box = [("state", read())]
        except CimHilError as error:
            box, failed = [("error", str(error))], error
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise failed or CimHilError(value)
    return value


def run_rank(world: ProcessGroupWorld, config: Any, data: Any, out_dir: str | Path, progress: bool,
             resume: dict | None = None, epochs: int | None = None, overwrite: bool = False) -> dict:
    """Train as one rank, a new run or the checkpoint ``resume`` continued; a failure here is
    reported to the others, one elsewhere is named."""
    from cim_hil.training.trainer import Trainer

    try:
        if resume is not None:
            trainer = Trainer.resume(out_dir, data, progress and world.rank == 0, world, state=resume)
        else:
            trainer = Trainer(config, data, out_dir, progress and world.rank == 0, world, overwrite=overwrite)
        trainer.print_placement()
        history = trainer.fit(epochs)
        summary = {"out": str(out_dir), "epochs": trainer.epoch, "ranks": world.size, **(history[-1] if history else {})}
        if trainer.board is not None:
            summary["board"] = trainer.board.info()
        return summary
    except RankStopped as error:  # a peer ended first
        raise world.failure_elsewhere(error, config.distributed_timeout_s) from None
    except CimHilError as error:
        world.report_failure(error)
        raise
    except RuntimeError as error:  # a collective failed: a peer left or hung
        raise world.failure_elsewhere(error, config.distributed_timeout_s) from None


def share_cores(ranks: int) -> None:
    """Give this rank's host compute its share of the machine's cores.

    Every spawned rank runs on this one host, and torch's thread pool would take every core in
    each: ranks step in lockstep, so their parallel regions run at once and spin at barriers for
    threads the other rank holds, turning a millisecond backward into a tenth of a second. A
    user's ``OMP_NUM_THREADS`` is kept (torchrun sets it to 1 itself)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks))


def _spawned(rank: int, size: int, port: int, config: Any, data: Any, out_dir: str, progress: bool,
             resume: dict | None, epochs: int | None, overwrite: bool, answers: multiprocessing.Queue) -> None:
    """One spawned rank: joins through the parent's store, answers (rank, summary or error)."""
    try:
        share_cores(size)
        store = dist.TCPStore("127.0.0.1", port, size + 1, is_master=False,
                              timeout=timedelta(seconds=config.distributed_timeout_s))
        world = join_group(rank, size, dist.PrefixStore("group", store), config.distributed_timeout_s)
        answers.put((rank, "done", run_rank(world, config, data, out_dir, progress, resume, epochs, overwrite)))
    except CimHilError as error:
        answers.put((rank, "error", str(error)))
    except BaseException as error:  # anything else is a bug: its traceback, not a hang
        answers.put((rank, "crash", "".join(traceback.format_exception(error))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(config: Any, data: Any, out_dir: str | Path, nproc: int, progress: bool = True,
                resume: dict | None = None, epochs: int | None = None, overwrite: bool = False) -> dict:
    """Run ``nproc`` ranks as child processes around a store this process holds (a new run, or
    the checkpoint ``resume`` continued); returns rank 0's summary, or raises one ``BoardError``
    with every rank's error, a line each."""
    check_ranks(config, nproc)
    timeout = timedelta(seconds=config.distributed_timeout_s)
    # Children do not inherit the process group; the store lives here so it outlives any rank.
    store = dist.TCPStore("127.0.0.1", 0, nproc + 1, is_master=True, timeout=timeout, wait_for_workers=False)
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    ranks = [context.Process(target=_spawned, args=(rank, nproc, store.port, config, data, str(out_dir), progress,
                                                    resume, epochs, overwrite, answers), daemon=True) for rank in range(nproc)]
    for process in ranks:
        process.start()
    results: dict[int, tuple[str, Any]] = {}
    # Once a rank has failed, every other rank stops within the timeout (plus the wait for a
    # failed peer's report); one that has not by then hangs itself (its board, or its process,
    # stopped answering), and is killed rather than waited for.
    deadline = None
    while len(results) < nproc:
        try:
            rank, kind, value = answers.get(timeout=0.5)
            results[rank] = (kind, value)
            if kind != "done" and deadline is None:
                deadline = time.monotonic() + config.distributed_timeout_s + REPORT_WAIT_S
            continue
        except queue.Empty:
            pass
        if all(process.exitcode is not None for process in ranks):  # all gone: what they said is queued by now
            while not answers.empty():
                rank, kind, value = answers.get()
                results[rank] = (kind, value)
            for rank, process in enumerate(ranks):
                results.setdefault(rank, ("error", f"ended (exit code {process.exitcode}) without a report"))
        elif deadline is not None and time.monotonic() > deadline:
            for rank, process in enumerate(ranks):
                if rank not in results:
                    process.kill()
                    url = ProcessGroupWorld(rank, nproc, torch.device("cpu")).board_url(config)
                    results[rank] = ("error", f"rank {rank} (board {url}) did not stop within "
                                     f"{config.distributed_timeout_s + REPORT_WAIT_S:g} s of another rank's error; "
                                     "killed")
    for process in ranks:
        process.join(REPORT_WAIT_S)
        if process.is_alive():  # answered but stuck on its way out
            process.kill()
    crashes = [value for kind, value in results.values() if kind == "crash"]
    if crashes:
        print(crashes[0], file=sys.stderr)
    failed = {rank: value for rank, (kind, value) in sorted(results.items()) if kind != "done"}
    if failed:
        raise BoardError("; ".join(f"rank {rank}: {text.splitlines()[-1] if text else text}"
                                   for rank, text in failed.items()))
    return results[0][1]
