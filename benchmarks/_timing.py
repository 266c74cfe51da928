"""Shared helper for the benchmarks: best-of-N wall time of a callable."""

import time
from collections.abc import Callable


def best_seconds(work: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Smallest wall time over ``repeats`` runs; the minimum is the least noisy estimate."""
    for _ in range(warmup):
        work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best
