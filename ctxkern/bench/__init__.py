"""The benchmark harness behind `ctxkern bench` and benchmarks/: correctness first, then medians, GB/s,
TFLOP/s, the ratio to torch eager and the fraction of the device's peak measured in the same run."""
from __future__ import annotations

import ctypes
import datetime
import re
import time
from typing import Callable

import torch

from ctxkern.bench import attention, bert, clip, elmo, layer_norm, lstm_cell, masked_mean_pool
from ctxkern.bench.case import Case, run_case
from ctxkern.bench.peaks import measure_peaks
from ctxkern.bench.report import git_commit

# op name -> cases(device, quick, with_compile)
OPS: dict[str, Callable[[str, bool, bool], list[Case]]] = {"layer_norm": layer_norm.cases,
                                                            "masked_mean_pool": masked_mean_pool.cases,
                                                            "attention": attention.cases,
                                                            "lstm_cell": lstm_cell.cell_cases,
                                                            "lstm": lstm_cell.layer_cases,
                                                            "bert": bert.cases,
                                                            "clip": clip.cases, "elmo": elmo.cases}


def steady_cpu_allocator() -> str:
    """Makes glibc keep freed large blocks for reuse instead of returning them to the OS.

    By default glibc maps every allocation above a threshold afresh, and each run of an op then pays page
    faults and page zeroing for its output, by an amount that depends on the order in which the candidates
    free and allocate: that noise swamped the kernels' differences. This gives every candidate the steady
    state a caching allocator (jemalloc, tcmalloc, a long-running server's heap) gives. Only this process.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 2**30) == 1 and libc.mallopt(m_trim_threshold, 2**30) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc, large blocks reused (mallopt M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = 1 GiB)" if ok else "default"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def run(ops: list[str], device: str, *, quick: bool = False, with_compile: bool = True,
        progress: Callable[[str], None] = lambda msg: None) -> dict:
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {', '.join(unknown)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    allocator = steady_cpu_allocator() if device == "cpu" else "torch CUDA caching allocator"
    torch.manual_seed(0)
    start = time.perf_counter()
    peaks = measure_peaks(device, quick, progress)
    rows = []
    for op in ops:
        progress(f"{op}: setting up its cases")
        cases = OPS[op](device, quick, with_compile)
        for i, case in enumerate(cases, 1):
            progress(f"[{time.perf_counter() - start:4.0f} s] {op} {i}/{len(cases)}: {case.op} {case.shape} "
                     f"{str(case.dtype).removeprefix('torch.')}")
            rows += run_case(case, device, peaks)
    name = device_name(device)
    return {"device": name, "device_slug": "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()),
            "device_type": device,
            "date": datetime.date.today().isoformat(), "ops": ops, "commit": git_commit(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "allocator": allocator, "peak": peaks, "rows": rows}
