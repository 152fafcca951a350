"""The device's ceilings, measured in the same run as the benchmarks they scale.

GPU: a large device-to-device copy (the GPU timings flush the L2, so every case reads device memory, as the
copy does) and large bf16 and fp32 matmuls; fp16 rows are scaled by the bf16 rate, the same tensor-core rate.

CPU: an fp32 matmul and a copy larger than the last-level cache (main memory). No bf16 matmul: a CPU without
AMX emulates it at a small fraction of the fp32 rate (one such measurement took 16 minutes and gave
0.00 TFLOP/s), so a bf16 compute row on a CPU gets no fraction. The main-memory copy is reported, not used to
scale rows: CPU timings do not flush the caches, and a working set of a few MiB then runs from L2 or L3 at
several times main memory's bandwidth (rows over 100% "of peak" against it). A CPU case's GB/s is scaled
instead by copies of its own size timed in its own interleaved rounds (case.same_size_copies).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ctxkern.bench.timing import time_cpu_rounds, time_cuda

GPU_COPY_BYTES = 2 * 2**30      # per buffer: far beyond any L2 (60 MB on an H200)
GPU_MATMUL_N = 8192
CPU_MATMUL_N = 2048             # MKL/oneDNN's fp32 rate is flat from about 1024 on; 2048 takes ~0.2 s a call
CPU_COPY_MIN_BYTES = 64 * 2**20
FALLBACK_CACHE_BYTES = 32 * 2**20


def last_level_cache_bytes() -> Optional[int]:
    """The largest cache of CPU 0 as Linux reports it (sysfs), or None where it is not reported."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes) if sizes else None


# A peak is a ceiling: each is the fastest round (CPU) or run (GPU) of its measurement, where the rows report
# medians; on a shared machine a slow moment then lowers a row, never the ceiling it is compared with.
def _cpu_timer(rounds: int) -> Callable[[Callable[[], object]], float]:
    return lambda fn: min(time_cpu_rounds([fn], rounds=rounds, warmup=1)[0])


def _gpu_timer(fn: Callable[[], object]) -> float:
    return time_cuda(fn, mode="min")


def copy_gbps(nbytes: int, device: str, timer: Callable) -> float:
    """GB/s of dst.copy_(src) for buffers of nbytes each, counting bytes read plus written."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timer(lambda: dst.copy_(src)) / 1e6


def matmul_tflops(n: int, dtype: torch.dtype, device: str, timer: Callable) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timer(lambda: a @ b) / 1e9


def measure_peaks(device: str, quick: bool = False, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """copy_gbps over copy_bytes moved per call (read plus written); fp32_tflops and bf16_tflops (None on a
    CPU); cache_bytes: the CPU's last-level cache (None on a GPU). A few seconds on a CPU."""
    start = time.perf_counter()
    if device == "cuda":
        timer, buffer_bytes = _gpu_timer, GPU_COPY_BYTES
        cache = None
    else:
        timer = _cpu_timer(5 if quick else 10)
        cache = last_level_cache_bytes()
        # Twice the cache per buffer: the copy's 4x-cache working set cannot stay in it.
        buffer_bytes = max(CPU_COPY_MIN_BYTES, 2 * (cache or FALLBACK_CACHE_BYTES))
    progress(f"peak: copy of {buffer_bytes / 2**20:.0f} MiB")
    peaks = {"copy_gbps": copy_gbps(buffer_bytes, device, timer), "copy_bytes": 2 * buffer_bytes}
    n = GPU_MATMUL_N if device == "cuda" else CPU_MATMUL_N
    progress(f"peak: fp32 matmul {n}x{n}x{n}")
    peaks["fp32_tflops"] = matmul_tflops(n, torch.float32, device, timer)
    peaks["bf16_tflops"] = None
    if device == "cuda":
        progress(f"peak: bf16 matmul {n}x{n}x{n}")
        peaks["bf16_tflops"] = matmul_tflops(n, torch.bfloat16, device, timer)
    peaks["cache_bytes"] = cache
    progress(f"peaks measured in {time.perf_counter() - start:.1f} s")
    return peaks
