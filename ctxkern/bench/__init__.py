"""The benchmark harness behind `ctxkern bench` and benchmarks/: correctness first, then medians, GB/s,
TFLOP/s, the ratio to torch eager and the fraction of the device's peak measured in the same run."""
from __future__ import annotations

import datetime
import re
from typing import Callable

import torch

from ctxkern.bench import layer_norm
from ctxkern.bench.case import Case, run_case
from ctxkern.bench.peaks import measure_peaks
from ctxkern.bench.report import git_commit

# op name -> cases(device, quick, with_compile)
OPS: dict[str, Callable[[str, bool, bool], list[Case]]] = {"layer_norm": layer_norm.cases}


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
    torch.manual_seed(0)
    progress("measuring peaks")
    peaks = measure_peaks(device, quick)
    rows = []
    for op in ops:
        for case in OPS[op](device, quick, with_compile):
            progress(f"{case.op} {case.shape} {str(case.dtype).removeprefix('torch.')}")
            rows += run_case(case, device, peaks)
    name = device_name(device)
    return {"device": name, "device_slug": "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()),
            "date": datetime.date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "peak": peaks, "rows": rows}
