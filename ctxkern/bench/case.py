"""A benchmark case: one op at one shape and dtype, its float64 reference, and the candidates that compete.

Every candidate's result is checked against the reference before it is timed; a wrong one is reported as
such and not timed.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ctxkern.bench.timing import time_cpu_rounds, time_cuda

# Allowed max |out - ref| / max(1, max |ref|): a sanity bound that catches wrong kernels, not an ulp test
# (the tests hold the kernels to the tight bounds).
SANITY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@dataclass
class Candidate:
    backend: str                                  # e.g. "torch eager", "torch.compile", "ctxkern.cpu"
    fn: Callable[[], object]                      # one run; returns a Tensor or a tuple of Tensors
    baseline: bool                                # True for PyTorch and peers, False for ctxkern's own kernels
    skip: Optional[str] = None                    # why this candidate cannot run here (an optional peer)


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    bytes_moved: Optional[float]                  # the fewest bytes the op must read and write; None end to end
    flops: Optional[float]                        # useful floating-point operations, None for memory-bound ops
    reference: Callable[[], Sequence[Tensor]]     # float64 results
    candidates: list[Candidate] = field(default_factory=list)
    # End-to-end cases (a model encoding sentences): the items one run processes, reported per second, and the
    # peer the speed-up is taken against, as it has no "torch eager" candidate.
    items: Optional[int] = None
    peer: Optional[str] = None
    # Timing rounds on a CPU: fewer for end-to-end cases, whose one run lasts seconds.
    cpu_rounds: int = 15
    cpu_warmup: int = 3


def backward_only(forward: Callable, leaves: Sequence[Tensor], grad_outputs, *rest) -> Callable[[], tuple]:
    """A candidate's fn that times the backward alone: forward(*leaves, *rest) runs once, on the first call
    (inside the harness's check, which reports a candidate that fails to compile or run); every call returns
    the gradients of its output with respect to leaves."""
    graph = {}

    def backward():
        if "out" not in graph:
            graph["out"] = forward(*leaves, *rest)
        return torch.autograd.grad(graph["out"], leaves, grad_outputs, retain_graph=True)

    return backward


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check(candidate: Candidate, reference: Sequence[Tensor], dtype: torch.dtype) -> Optional[str]:
    """None when candidate's result matches the reference, else a description of the mismatch."""
    outs = _as_tuple(candidate.fn())
    if len(outs) != len(reference):
        return f"returned {len(outs)} tensors, expected {len(reference)}"
    for i, (out, ref) in enumerate(zip(outs, reference)):
        err = (out.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        if not err <= SANITY_TOLERANCE[dtype]:
            return f"output {i} off by {err:.3g} of the reference's largest magnitude"
    return None


def _new_row(case: Case, cand: Candidate) -> dict:
    row = {"op": case.op, "backend": cand.backend, "shape": case.shape,
           "dtype": str(case.dtype).removeprefix("torch."), "median_ms": None, "gbps": None, "tflops": None,
           "speedup_vs_torch": None, "peak_fraction": None, "peak_basis": None, "baseline": cand.baseline}
    if case.items is not None:
        row["items_per_s"] = None
    if case.peer is not None:
        row |= {"peer": case.peer, "speedup_vs_peer": None}
    return row


# peak_basis values: what a row's peak_fraction divides by.
FP32_MATMUL, BF16_MATMUL, DEVICE_COPY, SAME_SIZE_COPY = "fp32 matmul", "bf16 matmul", "copy", "same-size copy"


def compute_peak(peaks: dict, dtype: torch.dtype) -> tuple[Optional[float], Optional[str]]:
    """The matmul rate (TFLOP/s) a row of this dtype is compared with, and its name: fp32 against fp32, bf16
    and fp16 against bf16 (one tensor-core rate); (None, None) where this run measured none (bf16 or fp16 on
    a CPU, any other dtype)."""
    key, basis = {torch.float32: ("fp32_tflops", FP32_MATMUL), torch.bfloat16: ("bf16_tflops", BF16_MATMUL),
                  torch.float16: ("bf16_tflops", BF16_MATMUL)}.get(dtype, (None, None))
    return (peaks[key], basis) if key is not None and peaks.get(key) else (None, None)


def same_size_copies(bytes_moved: float) -> tuple[list[Callable[[], object]], int]:
    """Two float32 copies that move about bytes_moved (4 bytes read plus 4 written per element), and their
    bytes: torch's copy_ on its threads, and numpy's single-threaded one. The ceiling is the faster: at a small
    size one thread can beat torch's fork and join, and on a loaded machine a thread pool stalls (both ways
    of copying seen: a 180 KB torch copy_ at 0.0 GB/s put a single-threaded kernel at 8578% of it)."""
    src = torch.rand(max(1, round(bytes_moved / 8)))
    dst = torch.empty_like(src)
    src_np, dst_np = src.numpy(), dst.numpy()
    return [lambda: dst.copy_(src), lambda: np.copyto(dst_np, src_np)], 8 * src.numel()


def _check_or_explain(cand: Candidate, reference: Sequence[Tensor], dtype: torch.dtype) -> Optional[str]:
    try:
        return check(cand, reference, dtype)
    except Exception as err:  # a candidate that cannot run here (a compile failure, an unsupported shape)
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        return f"failed: {type(err).__name__}: {first_line}"


def run_case(case: Case, device: str, peaks: dict) -> list[dict]:
    """Checks every candidate, then times the ones that may be timed: on a GPU one after another (the device
    is the run's alone), on a CPU in interleaved rounds (the machine is shared, and its speed drifts).

    A row's peak_fraction compares like with like (peak_basis names the peak): a row with a FLOP count against
    the matmul rate of its dtype; else, on a CPU, its GB/s against a copy of the same bytes timed in the same
    rounds (its fastest round), since neither is flushed from the caches between runs; on a GPU against the
    large copy."""
    reference = case.reference()
    rows, timed = [], []
    for cand in case.candidates:
        row = _new_row(case, cand)
        rows.append(row)
        if cand.skip is not None:
            row["skipped"] = cand.skip
            continue
        problem = _check_or_explain(cand, reference, case.dtype)
        if problem is not None and not cand.baseline:
            row["error"] = problem
            continue
        if problem is not None:
            # A peer less accurate than the sanity bound is still what its users run: timed, and flagged.
            row["note"] = f"inaccurate: {problem}"
        timed.append((row, cand))
    fns = [cand.fn for _, cand in timed]
    flop_peak, flop_basis = compute_peak(peaks, case.dtype)
    copies, copy_bytes = [], None
    if device == "cpu" and case.bytes_moved is not None and case.flops is None and timed:
        copies, copy_bytes = same_size_copies(case.bytes_moved)
        fns += copies
    if device == "cpu":
        samples = time_cpu_rounds(fns, rounds=case.cpu_rounds, warmup=case.cpu_warmup)
        times = [statistics.median(s) for s in samples]
    else:
        times = [time_cuda(fn) for fn in fns]
    same_size_gbps = None
    if copies:
        # The copy is a ceiling, like the run's peaks: its fastest round, where the rows report medians.
        del times[-len(copies):]
        same_size_gbps = copy_bytes / min(min(s) for s in samples[-len(copies):]) / 1e6
    eager_ms = next((ms for (row, _), ms in zip(timed, times) if row["backend"] == "torch eager"), None)
    peer_ms = next((ms for (row, _), ms in zip(timed, times) if row["backend"] == case.peer), None)
    for (row, _), ms in zip(timed, times):
        row["median_ms"] = ms
        if case.bytes_moved is not None:
            row["gbps"] = case.bytes_moved / ms / 1e6
        if case.flops is not None:
            row["tflops"] = case.flops / ms / 1e9
        if row["tflops"] is not None:
            if flop_peak is not None:
                row["peak_fraction"], row["peak_basis"] = row["tflops"] / flop_peak, flop_basis
        elif same_size_gbps is not None:
            row["peak_fraction"], row["peak_basis"] = row["gbps"] / same_size_gbps, SAME_SIZE_COPY
            row["same_size_copy_gbps"] = same_size_gbps
        elif row["gbps"] is not None and peaks.get("copy_gbps"):
            row["peak_fraction"], row["peak_basis"] = row["gbps"] / peaks["copy_gbps"], DEVICE_COPY
        if eager_ms is not None:
            row["speedup_vs_torch"] = eager_ms / ms
        if case.items is not None:
            row["items_per_s"] = case.items / ms * 1e3
        if peer_ms is not None:
            row["speedup_vs_peer"] = peer_ms / ms
    if case.peer is not None:
        # End to end, each of ctxkern's rows against every peer that ran, not only the main one.
        peers = {row["backend"]: ms for (row, _), ms in zip(timed, times) if row["baseline"]}
        for (row, _), ms in zip(timed, times):
            if not row["baseline"]:
                row["speedup_vs_peers"] = {name: peer / ms for name, peer in peers.items()}
    return rows
