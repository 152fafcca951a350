"""The `ctxkern` command: info, --version, help text, and the benchmark harness's files."""
import argparse
import json
import os
import subprocess
import sys

import pytest

import ctxkern
from ctxkern import cli
from ctxkern.bench import onnx_runtime

ROW_KEYS = {"op", "backend", "shape", "dtype", "median_ms", "gbps", "tflops", "speedup_vs_torch", "peak_fraction",
            "baseline"}


def ctxkern_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxkern", *args], capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})


def test_info_lists_backends():
    proc = ctxkern_cli("info")
    assert proc.returncode == 0, proc.stderr
    for name in ("torch", "cpu", "cuda", "triton"):
        assert f"  {name}" in proc.stdout


def test_bench_writes_json_markdown_and_png(tmp_path):
    proc = ctxkern_cli("bench", "--op", "layer_norm", "--device", "cpu", "--quick", "--no-compile",
                       "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [json_path] = tmp_path.glob("*-cpu-layer_norm.json")
    result = json.loads(json_path.read_text())
    assert {"device", "device_type", "ops", "commit", "torch", "peak", "rows"} <= result.keys()
    assert result["ops"] == ["layer_norm"] and result["device_type"] == "cpu"
    peak = result["peak"]
    # On a CPU: the fp32 matmul rate, no bf16 one (emulated there), and a copy beyond the last-level cache.
    assert peak["copy_gbps"] > 0 and peak["fp32_tflops"] > 0 and peak["bf16_tflops"] is None
    assert peak["cache_bytes"] is None or peak["copy_bytes"] >= 4 * peak["cache_bytes"]
    rows = result["rows"]
    assert {(r["op"], r["shape"]) for r in rows} == {("layer_norm_fwd", "64x384"), ("layer_norm_fwd", "256x768"),
                                                     ("layer_norm_fwd_residual", "256x768"),
                                                     ("layer_norm_prenorm", "256x768"),
                                                     ("layer_norm_bwd", "256x768")}
    for row in rows:
        assert ROW_KEYS <= row.keys() and "error" not in row, row
        assert row["median_ms"] > 0 and row["gbps"] > 0 and row["speedup_vs_torch"] > 0
        # GB/s rows on a CPU are scaled by a copy of their own size timed with them, not by main memory's.
        assert row["peak_basis"] == "same-size copy" and row["same_size_copy_gbps"] > 0
        assert row["peak_fraction"] == pytest.approx(row["gbps"] / row["same_size_copy_gbps"])
    assert any(r["backend"] == "ctxkern.cpu" and not r["baseline"] for r in rows)
    assert any(r["backend"] == "torch eager" and r["speedup_vs_torch"] == 1.0 for r in rows)
    assert json_path.with_suffix(".md").read_text().startswith("# ctxkern benchmark")
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "ctxkern.cpu *" in proc.stdout
    assert "items/s" not in proc.stdout and all("items_per_s" not in r for r in rows)
    assert_fits_a_terminal(proc.stdout)
    assert "ms: median per call" in proc.stdout and "GFLOP/s" in proc.stdout
    assert "peak: fp32 matmul" in proc.stderr  # the peaks' progress


def assert_fits_a_terminal(stdout: str) -> None:
    table = [line for line in stdout.splitlines() if not line.startswith("wrote ")]
    assert table and max(len(line) for line in table) <= 120, max(table, key=len)


def test_bench_bert_quick_reports_sentences_per_second_against_sentence_transformers(tmp_path):
    proc = ctxkern_cli("bench", "--op", "bert", "--device", "cpu", "--quick", "--out", str(tmp_path / "out"),
                       env={"CTXKERN_CACHE": str(tmp_path / "cache")})          # the ONNX export's cache
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(next((tmp_path / "out").glob("*-cpu-bert.json")).read_text())
    rows = list(result["rows"])
    assert {r["backend"] for r in rows} == {"sentence-transformers encode", "HF BertModel (SDPA) + mean pool",
                                            "ONNX Runtime (CPU EP) + mean pool",
                                            "ctxkern.cpu SentenceEncoder", "ctxkern.cpu SentenceEncoder padded"}
    # ONNX Runtime is an optional peer: timed where it is installed, else skipped with the reason.
    [ort] = [r for r in rows if r["backend"].startswith("ONNX Runtime")]
    rows.remove(ort)
    assert ("skipped" in ort) == (onnx_runtime.unavailable_reason() is not None)
    if "skipped" in ort:
        assert f"skipped: {ort['skipped']}" in proc.stdout
    else:
        assert "error" not in ort and "note" not in ort and ort["speedup_vs_peer"] > 0, ort
        assert list((tmp_path / "cache" / "onnx").glob("*/model.onnx"))
    for row in rows:
        assert ROW_KEYS <= row.keys() and "error" not in row and "note" not in row, row
        assert row["op"] == "bert_encode" and "N=32 " in row["shape"] and row["dtype"] == "float32"
        assert row["items_per_s"] > 0 and row["tflops"] > 0 and row["gbps"] is None
        assert row["peer"] == "sentence-transformers encode" and row["speedup_vs_peer"] > 0
        assert row["speedup_vs_torch"] is None
        # End to end: model FLOPs over the fp32 matmul rate of the same run.
        assert row["peak_basis"] == "fp32 matmul"
        assert row["peak_fraction"] == pytest.approx(row["tflops"] / result["peak"]["fp32_tflops"])
    [st] = [r for r in rows if r["backend"] == "sentence-transformers encode"]
    assert st["speedup_vs_peer"] == 1.0
    for row in rows:
        if not row["baseline"]:      # ctxkern's rows, against every peer that ran
            assert set(row["speedup_vs_peers"]) == {r["backend"] for r in result["rows"]
                                                    if r["baseline"] and r["median_ms"] is not None}
    assert "items/s" in proc.stdout and "vs torch: vs sentence-transformers encode" in proc.stdout
    assert_fits_a_terminal(proc.stdout)


@pytest.mark.parametrize("args,message", [
    (("bench", "--op", "nope", "--device", "cpu"), "argument --op: invalid choice: 'nope'"),
    (("bench", "--threads", "-1", "--device", "cpu"), "argument --threads: must be 0"),
    (("bench", "--threads", "two", "--device", "cpu"), "argument --threads: must be an integer"),
])
def test_bench_rejects_bad_arguments(args, message, tmp_path):
    proc = ctxkern_cli(*args, "--out", str(tmp_path))
    assert proc.returncode == 2 and message in proc.stderr


def test_version():
    proc = ctxkern_cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"ctxkern {ctxkern.__version__}\n" == "ctxkern 0.1.0\n"


def test_bench_help_lists_the_ops():
    from ctxkern import bench

    assert cli.BENCH_OPS == tuple(bench.OPS)
    proc = ctxkern_cli("bench", "--help")
    assert proc.returncode == 0
    assert "{" + ",".join(bench.OPS) + "}" in proc.stdout


def _options(parser: argparse.ArgumentParser, path: str = "ctxkern"):
    """(command, action) for every argument of parser and of its subcommands, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_and_subcommand_has_help_text():
    options = list(_options(cli.build_parser()))
    commands = {path for path, _ in options}
    assert commands == {"ctxkern", "ctxkern embed", "ctxkern search", "ctxkern info", "ctxkern bench",
                        "ctxkern index", "ctxkern index build", "ctxkern index merge", "ctxkern index info",
                        "ctxkern clip", "ctxkern clip classify", "ctxkern clip search",
                        "ctxkern elmo", "ctxkern elmo embed-file"}
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in options
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"no help text: {missing}"
    named = {opt for _, a in options for opt in a.option_strings}
    assert {"--query", "--device", "--backend", "--model", "--corpus", "--top", "--word", "--out", "--threads",
            "--quick", "--no-compile", "--op", "--version", "--index", "--jsonl-field", "--approximate"} <= named
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert all(choice.help for choice in subparsers._choices_actions)
