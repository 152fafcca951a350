"""The benchmark harness as a user reads it: timing loops long enough for small ops, peaks that take seconds,
"of peak" fractions that compare like with like, and a printed table that fits a 120-column terminal."""
import time

import pytest
import torch

from ctxkern.bench import case as case_module
from ctxkern.bench import peaks as peaks_module
from ctxkern.bench import timing
from ctxkern.bench.case import Candidate, Case, run_case
from ctxkern.bench.report import format_markdown, format_text, legend_line


class FakeClock:
    """perf_counter for timing.py, advanced only by the functions under test."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_a_10_microsecond_call_is_timed_in_loops_of_thousands(clock):
    def op():
        clock.now += 10e-6

    assert timing.calls_per_round(op, min_seconds=0.02) == pytest.approx(2000, abs=2)


def test_a_slow_first_call_does_not_shorten_the_rounds(clock):
    """One cold call of 5 ms used to set 4 calls per round for an op of 10 us (rounds of 40 us)."""
    calls = []

    def op():
        clock.now += 5e-3 if not calls else 10e-6
        calls.append(None)

    k = timing.calls_per_round(op, min_seconds=0.02)
    assert k >= 1000


def test_a_call_longer_than_a_round_runs_once_per_round(clock):
    def op():
        clock.now += 1.5

    assert timing.calls_per_round(op, min_seconds=0.02) == 1


def _case(dtype, bytes_moved=None, flops=None) -> Case:
    x = torch.ones(4)
    return Case(op="toy", shape="4", dtype=dtype, bytes_moved=bytes_moved, flops=flops,
                reference=lambda: (x.double(),),
                candidates=[Candidate("torch eager", lambda: x.clone(), baseline=True),
                            Candidate("ctxkern.cpu", lambda: x.clone(), baseline=False)])


PEAKS = {"copy_gbps": 10.0, "copy_bytes": 2**30, "fp32_tflops": 0.1, "bf16_tflops": None, "cache_bytes": 2**25}


@pytest.fixture
def one_ms_each(monkeypatch):
    """Every timed function takes 1 ms (a median of 1 ms, its fastest round too); returns the lists of functions
    the CPU timer was given."""
    given = []

    def fake(fns, **kwargs):
        given.append(fns)
        return [[1.0, 1.5, 1.0] for _ in fns]

    monkeypatch.setattr(case_module, "time_cpu_rounds", fake)
    monkeypatch.setattr(case_module, "time_cuda", lambda fn: 1.0)
    return given


def test_gb_rows_on_a_cpu_are_scaled_by_a_copy_of_their_size_timed_with_them(one_ms_each):
    rows = run_case(_case(torch.float32, bytes_moved=8e6), "cpu", PEAKS)
    [fns] = one_ms_each
    assert len(fns) == 4  # both candidates, then the same-size copies (threaded, single) in the same rounds
    for row in rows:
        assert row["gbps"] == pytest.approx(8.0) and row["same_size_copy_gbps"] == pytest.approx(8.0)
        assert row["peak_basis"] == "same-size copy" and row["peak_fraction"] == pytest.approx(1.0)


def test_the_same_size_copy_is_a_ceiling_its_fastest_round_against_the_rows_medians(monkeypatch):
    """On a shared machine a slow moment must lower a row, never the peak it is compared with: the fastest round
    of either copy (here the single-threaded one's) is the ceiling."""
    def fake(fns, **kwargs):
        return [[1.0, 1.0, 3.0] for _ in fns[:-2]] + [[2.0, 2.0, 2.0], [2.0, 0.5, 2.0]]

    monkeypatch.setattr(case_module, "time_cpu_rounds", fake)
    for row in run_case(_case(torch.float32, bytes_moved=8e6), "cpu", PEAKS):
        assert row["median_ms"] == 1.0 and row["same_size_copy_gbps"] == pytest.approx(16.0)
        assert row["peak_fraction"] == pytest.approx(0.5)


def test_the_same_size_copies_move_the_cases_bytes():
    fns, nbytes = case_module.same_size_copies(3e6)
    assert nbytes == pytest.approx(3e6, abs=8)
    for fn in fns:
        fn()


def test_fp32_compute_rows_are_scaled_by_the_fp32_matmul_rate(one_ms_each):
    rows = run_case(_case(torch.float32, bytes_moved=1e6, flops=2e7), "cpu", PEAKS)
    assert len(one_ms_each[0]) == 2  # a row with flops needs no copy
    for row in rows:
        assert row["tflops"] == pytest.approx(0.02)
        assert row["peak_basis"] == "fp32 matmul" and row["peak_fraction"] == pytest.approx(0.2)


def test_bf16_compute_rows_on_a_cpu_get_no_fraction(one_ms_each):
    rows = run_case(_case(torch.bfloat16, flops=2e7), "cpu", PEAKS)
    assert all(r["peak_fraction"] is None and r["peak_basis"] is None for r in rows)


def test_on_a_gpu_fp16_compute_rows_use_the_bf16_rate_and_gb_rows_the_device_copy(one_ms_each):
    gpu = PEAKS | {"bf16_tflops": 0.5, "cache_bytes": None}
    [row, _] = run_case(_case(torch.float16, flops=1e8), "cuda", gpu)
    assert row["peak_basis"] == "bf16 matmul" and row["peak_fraction"] == pytest.approx(0.2)
    [row, _] = run_case(_case(torch.bfloat16, bytes_moved=5e6), "cuda", gpu)
    assert row["peak_basis"] == "copy" and row["peak_fraction"] == pytest.approx(0.5)
    assert "same_size_copy_gbps" not in row


def test_cpu_peaks_take_seconds_and_report_fp32_not_bf16():
    messages = []
    start = time.perf_counter()
    peaks = peaks_module.measure_peaks("cpu", quick=True, progress=messages.append)
    # About 5 s on an idle 2-core machine; the bf16 matmul it replaced took 16 minutes.
    assert time.perf_counter() - start < 60
    assert peaks["fp32_tflops"] > 0 and peaks["bf16_tflops"] is None and peaks["copy_gbps"] > 0
    assert any("fp32 matmul" in m for m in messages) and any("copy" in m for m in messages)
    cache = peaks_module.last_level_cache_bytes()
    assert peaks["cache_bytes"] == cache
    if cache is not None:
        assert peaks["copy_bytes"] >= 4 * cache  # main memory, not the cache


def test_last_level_cache_reads_sysfs_sizes(tmp_path, monkeypatch):
    for name, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "260M")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    real_path = peaks_module.Path
    monkeypatch.setattr(peaks_module, "Path", lambda p: tmp_path if "cpu0/cache" in str(p) else real_path(p))
    assert peaks_module.last_level_cache_bytes() == 260 * 2**20


def _row(op, shape, backend, baseline=True, **extra):
    row = {"op": op, "backend": backend, "shape": shape, "dtype": "float32", "median_ms": 0.0123, "gbps": 45.6,
           "tflops": None, "speedup_vs_torch": 1.07, "peak_fraction": 0.5, "peak_basis": "same-size copy",
           "same_size_copy_gbps": 91.2, "baseline": baseline}
    return row | extra


def test_the_printed_table_fits_120_columns_and_explains_its_columns():
    long_shape = "all-MiniLM-L6-v2 N=256 tokens=12345 real=55%" * 2
    rows = [_row("masked_mean_pool_bwd_normalize", "64x256x384", "torch eager"),
            _row("masked_mean_pool_bwd_normalize", "64x256x384", "torch.compile (sentence-transformers expr)"),
            _row("masked_mean_pool_bwd_normalize", "64x256x384", "ctxkern.cpu", baseline=False,
                 error="output 0 off by 3.2 of the reference's largest magnitude" * 4, median_ms=None, gbps=None,
                 peak_fraction=None),
            _row("bert_encode", long_shape, "sentence-transformers encode", items_per_s=123.4, gbps=None,
                 tflops=0.012, peak_basis="fp32 matmul", same_size_copy_gbps=None, speedup_vs_torch=None,
                 peer="sentence-transformers encode", speedup_vs_peer=1.0, note="inaccurate: " + "x" * 200)]
    result = {"device": "cpu (2 threads)", "device_type": "cpu", "torch": "2.13.0", "commit": "0123456789ab",
              "date": "2026-12-01", "allocator": "glibc, large blocks reused", "ops": ["masked_mean_pool", "bert"],
              "peak": PEAKS, "rows": rows}
    text = format_text(result)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert legend_line(result) in lines and len(legend_line(result)) <= 120
    assert "fp32 matmul 100.0 GFLOP/s" in text and "GFLOP/s" in lines[4] and "items/s" in lines[4]
    assert "masked_mean_pool_bwd_normalize 64x256x384 float32  (of peak: a same-size copy, 91.2 GB/s)" in lines
    assert any(line.strip().startswith("ctxkern.cpu *") and "WRONG" in line for line in lines)
    assert any(line.strip().startswith("WRONG: output 0 off by 3.2") for line in lines)
    assert any("vs torch: vs sentence-transformers encode" in line for line in lines)
    # The wide form keeps every field, in the Markdown file.
    markdown = format_markdown(result)
    assert long_shape in markdown and "a same-size copy, 91.2 GB/s" in markdown and "| peak basis |" in markdown
