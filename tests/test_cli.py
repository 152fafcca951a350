"""The `ctxkern` command: info and the benchmark harness's files."""
import json
import subprocess
import sys

import pytest

ROW_KEYS = {"op", "backend", "shape", "dtype", "median_ms", "gbps", "tflops", "speedup_vs_torch", "peak_fraction",
            "baseline"}


def ctxkern_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxkern", *args], capture_output=True, text=True, timeout=600)


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
    assert {"device", "ops", "commit", "torch", "peak", "rows"} <= result.keys()
    assert result["ops"] == ["layer_norm"]
    assert result["peak"]["copy_gbps"] > 0 and result["peak"]["bf16_tflops"] > 0
    rows = result["rows"]
    assert {r["op"] for r in rows} == {"layer_norm_fwd", "layer_norm_fwd_residual", "layer_norm_bwd"}
    for row in rows:
        assert ROW_KEYS <= row.keys() and "error" not in row, row
        assert row["median_ms"] > 0 and row["gbps"] > 0 and row["speedup_vs_torch"] > 0
    assert any(r["backend"] == "ctxkern.cpu" and not r["baseline"] for r in rows)
    assert any(r["backend"] == "torch eager" and r["speedup_vs_torch"] == 1.0 for r in rows)
    assert json_path.with_suffix(".md").read_text().startswith("# ctxkern benchmark")
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "ctxkern.cpu *" in proc.stdout
    assert "items/s" not in proc.stdout and all("items_per_s" not in r for r in rows)


def test_bench_bert_quick_reports_sentences_per_second_against_sentence_transformers(tmp_path):
    proc = ctxkern_cli("bench", "--op", "bert", "--device", "cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(next(tmp_path.glob("*-cpu-bert.json")).read_text())["rows"]
    assert {r["backend"] for r in rows} == {"sentence-transformers encode", "HF BertModel (SDPA) + mean pool",
                                            "ctxkern.cpu SentenceEncoder", "ctxkern.cpu SentenceEncoder padded"}
    for row in rows:
        assert ROW_KEYS <= row.keys() and "error" not in row and "note" not in row, row
        assert row["op"] == "bert_encode" and "N=32 " in row["shape"] and row["dtype"] == "float32"
        assert row["items_per_s"] > 0 and row["tflops"] > 0 and row["gbps"] is None
        assert row["peer"] == "sentence-transformers encode" and row["speedup_vs_peer"] > 0
        assert row["speedup_vs_torch"] is None
    [st] = [r for r in rows if r["backend"] == "sentence-transformers encode"]
    assert st["speedup_vs_peer"] == 1.0
    assert "items/s" in proc.stdout and "x vs sentence-transformers encode" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (("bench", "--op", "nope", "--device", "cpu"), "op must be one of"),
])
def test_bench_rejects_bad_arguments(args, message, tmp_path):
    proc = ctxkern_cli(*args, "--out", str(tmp_path))
    assert proc.returncode == 2 and message in proc.stderr
