"""The device's ceilings, measured in the same run as the benchmarks they scale."""
from __future__ import annotations

import torch

from ctxkern.bench.timing import time_cpu_interleaved, time_cuda


def measure_peaks(device: str, quick: bool = False) -> dict[str, float]:
    """copy_gbps: a large device-to-device copy, bytes read plus written; bf16_tflops: a large bf16 matmul."""
    timer = time_cuda if device == "cuda" else (lambda fn: time_cpu_interleaved([fn])[0])
    copy_bytes = (32 if quick else 256) * 2**20 if device == "cpu" else 2 * 2**30
    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    n = (512 if quick else 2048) if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = timer(lambda: a @ b)
    return {"copy_gbps": 2 * copy_bytes / copy_ms / 1e6, "bf16_tflops": 2 * n**3 / mm_ms / 1e9}
