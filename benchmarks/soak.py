"""Soak the virtual board: hostile clients that vanish with RST, between and during the sessions
of one well-behaved host, against a real ``cim-hil board serve --tcp`` process.

Each hostile client connects, sends one of: random bytes, half of a valid frame, or a flood of
requests it never reads (so the server's replies hit a reset socket), and then vanishes with
RST (SO_LINGER 0). Hostile traffic never changes the board's state (HELLO and READ_COUNTERS
only, or frames that never complete), so the well-behaved host's every answer must equal an
in-process emulator's with the same seed doing the same calls. ``rss_growth_mb`` is the
server's resident set at the end minus after the first well-behaved session.

    python benchmarks/soak.py [--clients 200] [--every 10]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import subprocess
import sys
import time

import torch

from cim_hil import open_board
from cim_hil.config import LinkConfig
from cim_hil.emulator.board import build_emulator, config_from_url
from drivers.link import BoardRefused
from firmware_protocol import messages as m
from firmware_protocol.framing import VERSION, Frame, encode_frame

SEED, TILES = 3, 1
LINK = LinkConfig(response_timeout_s=0.5, retries=4)


def serve() -> tuple[subprocess.Popen, str, int]:
    command = [sys.executable, "-m", "cim_hil.cli", "board", "serve", "--tcp", "0", "--tiles", str(TILES),
               "--seed", str(SEED)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    url = line.split()[3]  # "virtual board on socket://127.0.0.1:PORT (...)"
    return server, url, int(url.rsplit(":", 1)[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def hostile(port: int, rng: random.Random) -> str:
    """One client that misbehaves and vanishes with RST; returns what it did."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    kind = rng.choice(["garbage", "half_frame", "unread_flood"])
    try:
        if kind == "garbage":
            sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
        elif kind == "half_frame":
            wire = encode_frame(Frame(m.ReadCounters.TYPE, rng.randrange(1, 0x10000), m.ReadCounters(0).encode()))
            sock.sendall(wire[: rng.randrange(1, len(wire) - 1)])
        else:
            seq = rng.randrange(1, 0x10000)
            for offset in range(rng.randrange(50, 400)):
                request = m.Hello(VERSION) if offset % 2 else m.ReadCounters(0)
                sock.sendall(encode_frame(Frame(request.TYPE, (seq + offset) & 0xFFFF, request.encode())))
        time.sleep(rng.uniform(0, 0.01))
    except OSError:
        pass  # the server may refuse or reset a hostile client: that is allowed
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return kind


def well_behaved(url: str, twin, generator: torch.Generator, port: int, rng: random.Random, hostile_during: int,
                 kinds: dict[str, int]):
    """One session of a correct host; returns (requests, wrong answers, busy refusals)."""
    for busy in range(200):
        try:
            board = open_board(url, LINK)
            break
        except BoardRefused as refusal:
            if refusal.code != m.ErrorCode.BUSY:
                raise
            time.sleep(0.02)
    else:
        raise RuntimeError("the board stayed busy for 4 s")
    wrong = 0
    with board:
        tile, reference = board[0], twin[0]
        rows, cols = tile.spec.rows, tile.spec.cols
        x = torch.rand(8, rows, generator=generator) * 2 - 1
        pulses = torch.randint(-3, 4, (rows, cols), generator=generator) * (torch.rand(rows, cols, generator=generator) < 0.1)
        checks = [
            (lambda: tile.forward(x), lambda: reference.forward(x)),
            (lambda: tile.apply_pulses(pulses), lambda: reference.apply_pulses(pulses)),
            (lambda: tile.read_conductances((0, 8, 0, cols)), lambda: reference.read_conductances((0, 8, 0, cols))),
        ]
        for index, (asked, expected) in enumerate(checks):
            if index == 1:
                for _ in range(hostile_during):  # they meet a busy board and vanish mid-session
                    kind = hostile(port, rng)
                    kinds[kind] = kinds.get(kind, 0) + 1
            wrong += not torch.equal(asked(), expected())
    return len(checks), wrong, busy


def power_on(url: str) -> None:
    """RESET 1: the board as it was built, whatever hosts did to it before the soak."""
    with open_board(url, LINK) as board:
        board.link.request(m.Reset(1), m.Ack)


def soak(server: subprocess.Popen, url: str, port: int, clients: int, every: int, seed: int = 0) -> dict:
    """``clients`` hostile clients, a well-behaved session after every ``every`` of them."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    power_on(url)
    twin = build_emulator(config_from_url(f"emulator:?seed={SEED}&tiles={TILES}"))
    started = time.perf_counter()
    requests = wrong = refused = sessions = 0
    kinds: dict[str, int] = {}
    baseline = peak = None
    done = 0
    while done < clients:
        burst = min(every, clients - done)
        during = burst // 2 if sessions % 2 else 0
        for _ in range(burst - during):
            kind = hostile(port, rng)
            kinds[kind] = kinds.get(kind, 0) + 1
        asked, bad, busy = well_behaved(url, twin, generator, port, rng, during, kinds)
        done += burst
        sessions += 1
        requests, wrong, refused = requests + asked, wrong + bad, refused + busy
        rss = rss_mb(server.pid)
        baseline = rss if baseline is None else baseline
        peak = max(peak or rss, rss)
    final = rss_mb(server.pid)
    return {
        "clients": clients,
        "hostile_kinds": kinds,
        "server_alive": server.poll() is None,
        "well_behaved_sessions": sessions,
        "well_behaved_requests": requests,
        "wrong_answers": wrong,
        "busy_refusals_seen": refused,
        "rss_start_mb": round(baseline, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(final - baseline, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="hostile clients per well-behaved session")
    options = parser.parse_args()
    process, address, number = serve()
    try:
        report = soak(process, address, number, options.clients, options.every)
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
    print(json.dumps({**report, "server_stderr_lines": len(errors.splitlines())}, indent=2))
