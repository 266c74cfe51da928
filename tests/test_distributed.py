"""Data-parallel training on torch.distributed (gloo), with real processes and real boards."""

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.distributed import join_group
from cim_hil.training.mnist import load_mnist


def _host_state(trainer) -> torch.Tensor:
    """Everything the ranks must agree on, end to end: weights, biases, levels, chi, writes, Adam's moments."""
    parts = [tensor.detach().double().flatten() for tensor in trainer.model.state_dict().values()]
    for state in trainer.optimizer.state.values():
        parts += [state[name].double().flatten() for name in ("chi", "writes", "exp_avg", "exp_avg_sq") if name in state]
    return torch.cat(parts)


def _rank(rank, port, config, data, out, answers):
    store = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=60))
    world = join_group(rank, 2, store, 60.0)
    try:
        trainer = Trainer(config, data, out, progress=False, world=world)
        step, checks = trainer.optimizer.step, []

        def step_and_compare():
            step()
            mine = _host_state(trainer)
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine)
            checks.append((bool(torch.equal(both[0], both[1])), trainer.optimizer.last_step["devices_programmed"]))

        trainer.optimizer.step = step_and_compare
        history = trainer.fit(1)
        g = trainer.board[0].read_conductances()  # plain numbers through the queue: a tensor would outlive its process
        answers.put((rank, checks, history, trainer.board.info()["seed"], g.flatten().tolist()))
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_two_chips_keep_the_same_host_weights_and_chi_after_every_step(tmp_path):
    config = TrainConfig(epochs=1, batch_size=16, train_limit=96, test_limit=50, lr=0.05, host_layers=["7"], pack=True)
    data = load_mnist(None)
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    ranks = [context.Process(target=_rank, args=(rank, store.port, config, data, str(tmp_path), answers))
             for rank in range(2)]
    for process in ranks:
        process.start()
    results = dict((answer[0], answer[1:]) for answer in (answers.get(timeout=300) for _ in ranks))
    for process in ranks:
        process.join(30)
        assert process.exitcode == 0
    (checks0, history0, seed0, g0), (checks1, history1, seed1, g1) = results[0], results[1]
    assert len(checks0) == len(checks1) == 3  # 96 digits, 48 per rank, 16 a step
    assert all(same for same, _ in checks0 + checks1)
    assert sum(programmed for _, programmed in checks0) > 0  # the devices were programmed, not merely skipped
    assert (seed0, seed1) == (0, 1) and g0 != g1  # two different chips
    assert [{k: v for k, v in row.items() if k != "train_seconds"} for row in history0] == [
        {k: v for k, v in row.items() if k != "train_seconds"} for row in history1]  # totals over both ranks
    assert history0[0]["ranks"] == 2 and history0[0]["train_samples"] == 96
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def _serve(tiles=4):
    """A virtual board in a process of its own, on a loopback TCP port: (process, URL)."""
    process = subprocess.Popen([sys.executable, "-m", "cim_hil.cli", "board", "serve", "--tcp", "0", "--tiles", str(tiles)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    url = re.search(r"socket://127\.0\.0\.1:\d+", line)
    assert url, line + process.stderr.read()
    return process, url.group(0)


def _into_the_first_steps(train: subprocess.Popen, out: Path) -> None:
    """Wait until ``train`` (still running) is a second into its first steps."""
    deadline = time.monotonic() + 240
    while not (out / "placement.json").exists():  # written once every rank has converted the model
        assert train.poll() is None, train.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)


CIM_HIL_TRAIN = ["-m", "cim_hil.cli", "train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _kill_a_board_mid_run(train_command: list[str], tmp_path, timeout_s: float):
    """Two ranks on two virtual boards, started by ``train_command`` (``cim-hil train`` and
    how to get two ranks); board 1 is killed in the first steps. (returncode, stderr, seconds
    from the kill to the end, board 1's URL)."""
    (board0, url0), (board1, url1) = _serve(), _serve()
    train = subprocess.Popen(
        [*train_command, "--rank-boards", url0, url1, "--host-layers", "auto", "--epochs", "2", "--train-limit", "2000",
         "--test-limit", "50", "--no-progress", "--distributed-timeout", str(timeout_s), "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _into_the_first_steps(train, tmp_path)
        board1.kill()
        killed = time.monotonic()
        _, stderr = train.communicate(timeout=timeout_s + 30)
        stopped_s = time.monotonic() - killed
    finally:
        for process in (train, board0, board1):
            process.kill()
            process.wait()
    return train.returncode, stderr, stopped_s, url1


def test_two_ranks_stop_with_an_error_naming_the_board_that_was_killed(tmp_path):
    timeout_s = 20
    code, stderr, stopped_s, url1 = _kill_a_board_mid_run([sys.executable, *CIM_HIL_TRAIN, "--nproc", "2"], tmp_path,
                                                          timeout_s)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("cim-hil: error:")]
    assert len(lines) == 1, stderr
    rank0, rank1 = lines[0].split("; rank 1: ")
    assert "rank 0: " in rank0 and f"because rank 1's board {url1} failed" in rank0
    assert url1.removeprefix("socket://") in rank1 and "resume with --resume" in rank1
    assert stopped_s < timeout_s, f"stopped {stopped_s:.1f} s after the board was killed"
    assert "Traceback" not in stderr


def _spawned_ranks(parent: int) -> list[int]:
    """The pids of the ranks ``parent`` spawned, rank 0 first (multiprocessing's resource
    tracker left out)."""
    ranks = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if ppid == parent and b"spawn_main" in command:
            ranks.append(pid)
    return sorted(ranks)  # started in rank order, pids not yet wrapped around on a test machine


def test_a_rank_that_hangs_is_reported_and_killed_and_nothing_waits_for_ever(tmp_path):
    """A rank's process stopped mid-run (SIGSTOP): the other rank's collective times out and it
    stops with an error; the parent then kills the hung rank instead of waiting for it."""
    timeout_s = 6
    train = subprocess.Popen(
        [sys.executable, *CIM_HIL_TRAIN, "--nproc", "2", "--host-layers", "7", "--pack", "--epochs", "2",
         "--train-limit", "4000", "--test-limit", "50", "--no-progress", "--distributed-timeout", str(timeout_s),
         "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _into_the_first_steps(train, tmp_path)
        ranks = _spawned_ranks(train.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = train.communicate(timeout=4 * timeout_s + 30)
        took_s = time.monotonic() - stopped
    finally:
        train.kill()
        train.wait()
    assert train.returncode == 2, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("cim-hil: error:")]
    assert f"did not answer within {timeout_s} s" in line and "rank 1 (board emulator:?seed=1) did not stop" in line
    assert "killed" in line and "Traceback" not in stderr
    # The other rank's collective times out, it waits for a report, then the parent as long again.
    assert took_s < 2 * (timeout_s + 5) + 10, f"{took_s:.1f} s"
    with pytest.raises(ProcessLookupError):
        os.kill(ranks[1], 0)


def test_under_torchrun_both_ranks_stop_naming_the_board_that_was_killed(tmp_path):
    """torchrun ends the other ranks with SIGTERM once one has ended: each still says which
    board failed, whether the signal or a failed collective reaches it first."""
    timeout_s = 20
    code, stderr, stopped_s, url1 = _kill_a_board_mid_run(
        [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *CIM_HIL_TRAIN], tmp_path, timeout_s)
    assert code != 0
    lines = sorted(line for line in stderr.splitlines() if line.startswith("cim-hil: error:"))
    assert len(lines) == 2, stderr
    failed, stopped = (lines[0], lines[1]) if "rank 0 (board" in lines[1] else (lines[1], lines[0])
    assert url1.removeprefix("socket://") in failed and "resume with --resume" in failed
    assert f"stopped because rank 1's board {url1} failed" in stopped
    assert stopped_s < timeout_s, f"stopped {stopped_s:.1f} s after the board was killed"
    assert not re.search(r'File ".*cim_hil', stderr), stderr  # torchrun prints its own summary; none of ours


def test_ranks_on_two_hosts_resume_from_rank_0s_directory_alone(tmp_path):
    """Two torchrun agents as two hosts, each with its own --out: only rank 0's holds the run,
    and --resume works on both, rank 0 handing its checkpoint to the other."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    train = ["--train-limit", "64", "--test-limit", "20", "--batch-size", "16", "--host-layers", "7", "--pack",
             "--no-progress"]

    def both_hosts(*extra: str) -> list[subprocess.CompletedProcess]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the two "hosts" share this machine's cores
        hosts = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                                   "--master-port", str(port), "--node-rank", str(node), *CIM_HIL_TRAIN, *train,
                                   "--out", str(tmp_path / f"host{node}"), *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for node in range(2)]
        return [subprocess.CompletedProcess(host.args, host.wait(timeout=300), *host.communicate()) for host in hosts]

    for host in both_hosts("--epochs", "1"):
        assert host.returncode == 0, host.stderr
    assert (tmp_path / "host0" / "checkpoint.pt").is_file() and not (tmp_path / "host1").exists()
    for host in both_hosts("--epochs", "2", "--resume"):
        assert host.returncode == 0, host.stderr
    rows = [json.loads(line) for line in (tmp_path / "host0" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["ranks"]) for row in rows] == [(1, 2), (2, 2)]
    assert not (tmp_path / "host1").exists()


def test_a_two_rank_run_resumes_from_rank_0s_checkpoint(tmp_path):
    common = ["--nproc", "2", "--train-limit", "64", "--test-limit", "20", "--batch-size", "16", "--lr", "0.05",
              "--host-layers", "7", "--pack", "--no-progress", "--out", str(tmp_path)]
    first = subprocess.run([sys.executable, "-m", "cim_hil.cli", "train", "--epochs", "1", *common],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and len(state["rank_boards"]) == 2
    generators = [board["tiles"][0]["generator"] for board in state["rank_boards"]]
    assert not torch.equal(*generators)  # each rank's own chip, its own random stream
    second = subprocess.run([sys.executable, "-m", "cim_hil.cli", "train", "--epochs", "2", "--resume",
                             "--distributed-timeout", "90", *common], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    # A resumed run may be given more patience, and its checkpoint records it.
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["config"]["distributed_timeout_s"] == 90
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and all(row["ranks"] == 2 for row in rows)
    # Both ranks on this host: each takes half its cores for host compute, not all of them.
    cores = int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, len(os.sched_getaffinity(0)) // 2)
    assert all(row["host_threads"] == cores for row in rows)
    alone = subprocess.run([sys.executable, "-m", "cim_hil.cli", "train", "--epochs", "3", "--resume", "--out",
                            str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert alone.returncode == 2 and "written by 2 rank(s); resume it with as many, not 1" in alone.stderr


def test_overwrite_reaches_the_spawned_rank_that_writes_the_run(tmp_path, capfd):
    """`--nproc` with `--overwrite` into a directory holding another file starts the run: the
    writing rank claims the directory with the user's --overwrite, not without it, and prints
    the placement as a single process does."""
    from cim_hil.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("kept by the user")
    tiny = ["--train-limit", "32", "--test-limit", "16", "--batch-size", "16", "--no-progress", "--epochs", "1"]
    assert main(["train", "--nproc", "1", "--out", str(out), *tiny]) == 2
    assert "is not empty" in capfd.readouterr().err
    code = main(["train", "--nproc", "1", "--out", str(out), "--overwrite", *tiny])
    err = capfd.readouterr().err
    assert code == 0, err
    assert (out / "checkpoint.pt").exists() and (out / "notes.txt").exists()
    assert f"placement: 18 tiles of 64x64, one block per tile; on the host: nothing (in {out}/placement.json)" in err


def test_each_rank_s_emulator_is_the_url_s_chip_seed_plus_its_rank(tmp_path):
    """The seed a rank's emulator gets starts from the URL's, else its config file's."""
    from cim_hil.emulator.board import config_from_url
    from cim_hil.errors import ConfigError
    from cim_hil.training.distributed import _emulator_seeded

    chip = tmp_path / "chip.toml"
    chip.write_text("seed = 7\n")
    assert [config_from_url(_emulator_seeded(f"emulator:{chip}", rank)).seed for rank in range(2)] == [7, 8]
    assert config_from_url(_emulator_seeded(f"emulator:{chip}?seed=3", 1)).seed == 4
    assert config_from_url(_emulator_seeded("emulator:?tiles=4", 1)).seed == 1
    with pytest.raises(ConfigError):
        _emulator_seeded("emulator:?seed=x", 0)


@pytest.mark.parametrize("gpus, local_ranks, expected", [(0, 1, "gloo"), (1, 1, "nccl"), (1, 2, "gloo"), (2, 2, "nccl")])
def test_nccl_only_when_every_rank_on_the_host_has_a_gpu_of_its_own(monkeypatch, gpus, local_ranks, expected):
    """No CUDA here, so its answers are patched: NCCL refuses two ranks on one GPU."""
    from cim_hil.training import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    assert distributed.backend(local_ranks) == expected
