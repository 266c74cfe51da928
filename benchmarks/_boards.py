"""Shared helper for the benchmarks: a paced virtual board in a process of its own."""

import re
import subprocess
import sys
from contextlib import ExitStack


def serve(stack: ExitStack, tiles: int, baud: int, seed: int) -> str:
    """A virtual board serving the emulator on a loopback socket, paced like a UART at
    ``baud``, in its own process (so it does not share this one's interpreter); its URL.
    Stopped when ``stack`` closes."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cim_hil.cli", "board", "serve", "--tcp", "0", "--tiles", str(tiles),
         "--seed", str(seed), "--pace-baud", str(baud)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.callback(process.wait)
    stack.callback(process.kill)
    line = process.stdout.readline()
    found = re.search(r"socket://127\.0\.0\.1:\d+", line)
    if not found:
        raise SystemExit(f"the virtual board did not start: {line}{process.stderr.read()}")
    return found.group(0)
