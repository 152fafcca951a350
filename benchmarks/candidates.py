"""pytest-benchmark suites over the harness's own cases (ctxkern.bench), so both time the same code."""
import functools

import pytest
import torch

from ctxkern.bench import OPS
from ctxkern.bench.case import check

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@functools.lru_cache(maxsize=None)
def cases(op: str, device: str):
    torch.manual_seed(0)
    return tuple(OPS[op](device, False, True))


def parametrize_candidates(metafunc, op: str) -> None:
    """One test per (device, case, candidate) of `op`."""
    params = []
    for device in DEVICES:
        for i, case in enumerate(cases(op, device)):
            for cand in case.candidates:
                ident = f"{device}-{case.op}-{case.shape}-{str(case.dtype).removeprefix('torch.')}-{cand.backend}"
                params.append(pytest.param(device, i, cand.backend, id=ident))
    metafunc.parametrize("device,case_index,backend", params)


def bench_candidate(benchmark, op: str, device: str, case_index: int, backend: str) -> None:
    case = cases(op, device)[case_index]
    cand = next(c for c in case.candidates if c.backend == backend)
    if cand.skip is not None:
        pytest.skip(f"{backend}: {cand.skip}")
    problem = check(cand, case.reference(), case.dtype)
    if problem is not None and not cand.baseline:
        pytest.fail(f"{backend} gives a wrong result: {problem}")
    fn = cand.fn
    if device == "cuda":
        def fn():
            cand.fn()
            torch.cuda.synchronize()
    benchmark.extra_info.update(op=case.op, shape=case.shape, bytes=case.bytes_moved, baseline=cand.baseline)
    benchmark(fn)
