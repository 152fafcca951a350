"""Timers: the median of repeated runs after warm-up; on a GPU with the L2 flushed between runs."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

# A calibration loop runs until it lasts this long: perf_counter's resolution (well under a microsecond) and
# the loop's own cost are then below 0.1% of it, even for a call of a few microseconds.
CALIBRATION_SECONDS = 1e-3


def _loop_seconds(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def calls_per_round(fn: Callable[[], object], min_seconds: float) -> int:
    """How many calls of fn one timed round makes so that it lasts about min_seconds.

    Taken from a loop of fn grown fourfold until it lasts CALIBRATION_SECONDS, then timed once more, the
    faster of the two kept: one call of a 10 us op is too short to time alone, and one slow moment (a cold
    cache, another process taking the core) would leave every round of a small op a few calls long, dominated
    by timer and loop overhead. An fn that lasts a round or more alone is not run again."""
    n = 1
    while (elapsed := _loop_seconds(fn, n)) < CALIBRATION_SECONDS:
        n *= 4
    if elapsed < min_seconds:
        elapsed = min(elapsed, _loop_seconds(fn, n))
    return max(1, math.ceil(min_seconds * n / elapsed))


def time_cpu_rounds(fns: list[Callable[[], object]], rounds: int = 15, min_seconds: float = 0.02,
                    warmup: int = 3) -> list[list[float]]:
    """Per-round wall time in ms per call of each fn, timed in alternating rounds so that every fn sees the
    same share of a shared machine's slow and fast moments: their ratios are then fair even when absolute
    times drift. Each round of a fn is a loop of calls_per_round(fn) calls (one for an fn that lasts
    min_seconds or more)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    reps = [calls_per_round(fn, min_seconds) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, k, out in zip(fns, reps, samples):
            out.append(_loop_seconds(fn, k) / k * 1e3)
    return samples


def time_cpu_interleaved(fns: list[Callable[[], object]], rounds: int = 15, min_seconds: float = 0.02,
                         warmup: int = 3) -> list[float]:
    """Median ms per call of each fn over time_cpu_rounds."""
    return [statistics.median(s) for s in time_cpu_rounds(fns, rounds, min_seconds, warmup)]


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100, mode: str = "median") -> float:
    """GPU time of fn in ms (mode "median", or "min" for a ceiling), L2 flushed before each run (triton's
    do_bench when available)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, warmup_ms, rep_ms, mode)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode=mode))


def _time_cuda_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float, mode: str) -> float:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / estimate))):
        flush.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return min(times) if mode == "min" else statistics.median(times)
