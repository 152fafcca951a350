"""The ONNX Runtime peer of `ctxkern bench --op bert` (export, cache, parity with sentence-transformers, skipping
when it cannot run) and the benchmark's second sentence set, real documentation paragraphs."""
import importlib.util

import pytest
import torch

from helpers import bundled_model_folder
from ctxkern.bench import bert, onnx_runtime, sentences
from ctxkern.bench.case import Candidate, Case, run_case
from ctxkern.bench.report import format_markdown, format_text

SENTENCES = ["A short query.", "The museum's newest exhibition follows the history of timekeeping from sundials "
             "and water clocks to the atomic standards that now define the second.", "Bread needs patience."]


def _needs_onnx_runtime():
    reason = onnx_runtime.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the ONNX Runtime peer cannot run here: {reason}")


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """The bundled model exported once for the session, into a cache folder of its own."""
    _needs_onnx_runtime()
    cache = tmp_path_factory.mktemp("onnx-cache")
    onnx_runtime.export_onnx(bundled_model_folder(), cache)
    return cache


def test_export_is_cached_and_keyed_by_the_model(onnx_cache):
    folder = bundled_model_folder()
    path = onnx_runtime.export_onnx(folder, onnx_cache)
    stamp = path.stat().st_mtime_ns
    assert onnx_runtime.export_onnx(folder, onnx_cache) == path and path.stat().st_mtime_ns == stamp
    assert path.parent.parent == onnx_cache / "onnx" and path.parent.name.startswith(f"{folder.name}-")
    assert not list(path.parent.glob("*.partial.onnx"))


def test_onnx_runtime_matches_sentence_transformers(onnx_cache):
    """The peer's embeddings against sentence-transformers' own encode in float64, before any timing."""
    from sentence_transformers import SentenceTransformer

    folder = bundled_model_folder()
    candidate = bert._onnx_runtime_candidate(folder, "cpu", torch.float32, SENTENCES, onnx_cache)
    assert candidate.skip is None
    ours = candidate.fn()
    reference = SentenceTransformer(str(folder), device="cpu").double().encode(SENTENCES, convert_to_tensor=True)
    assert ours.shape == (3, 384)
    assert (ours.double() - reference).abs().max() < 2e-6
    assert torch.nn.functional.cosine_similarity(ours.double(), reference).min() > 1 - 1e-9


def test_exported_graph_takes_any_batch_and_length(onnx_cache):
    """Dynamic axes: the traced example was (2, 8); other shapes, padding included, give BertModel's states."""
    from transformers import BertModel

    folder = bundled_model_folder()
    run = onnx_runtime.forward(onnx_runtime.session(onnx_runtime.export_onnx(folder, onnx_cache), threads=1))
    model = BertModel.from_pretrained(folder).eval()
    for b, s in ((1, 3), (5, 40)):
        ids = torch.randint(1000, 20000, (b, s))
        mask = torch.ones_like(ids)
        mask[-1, s // 2:] = 0
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = run({"input_ids": ids, "attention_mask": mask})
        assert got.shape == (b, s, 384)
        assert (got - expected)[mask.bool()].abs().max() < 1e-4


def test_missing_onnx_runtime_skips_the_peer_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    candidate = bert._onnx_runtime_candidate(bundled_model_folder(), "cpu", torch.float32, SENTENCES, None)
    assert candidate.skip is not None and "onnxruntime not installed" in candidate.skip


def test_a_skipped_peer_is_reported_and_speedups_name_every_peer():
    x = torch.arange(4.0)
    case = Case(op="end_to_end", shape="n=4", dtype=torch.float32, bytes_moved=None, flops=None,
                reference=lambda: (x.double(),), items=4, peer="main peer", cpu_rounds=1, cpu_warmup=0,
                candidates=[Candidate("main peer", lambda: x.clone(), baseline=True),
                            Candidate("other peer", lambda: x.clone(), baseline=True),
                            Candidate("absent peer", lambda: 1 / 0, baseline=True, skip="libfoo not installed"),
                            Candidate("ours", lambda: x.clone(), baseline=False)])
    rows = run_case(case, "cpu", {})
    assert rows[2]["skipped"] == "libfoo not installed" and rows[2]["median_ms"] is None
    assert set(rows[3]["speedup_vs_peers"]) == {"main peer", "other peer"}
    result = {"device": "cpu (2 threads)", "device_type": "cpu", "torch": torch.__version__, "commit": "abc",
              "date": "2026-12-01", "allocator": "default", "peak": {"copy_gbps": 1.0}, "rows": rows}
    text = format_text(result)
    assert "skipped: libfoo not installed" in text and "x vs other peer" in text
    assert "skipped: libfoo not installed" in format_markdown(result)


def test_doc_paragraphs_are_fixed_real_prose_and_mostly_long():
    from tokenizers import Tokenizer

    paragraphs = sentences.doc_paragraphs()
    assert paragraphs == sentences.doc_paragraphs() and len(paragraphs) == 128 == len(set(paragraphs))
    assert all(p.endswith(".") and ">>>" not in p and "\n" not in p for p in paragraphs)
    assert sentences.doc_paragraphs(4) != paragraphs[:4]          # spread over all topics, not their first ones
    tokenizer = Tokenizer.from_file(str(bundled_model_folder() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(paragraphs)]
    assert sum(n >= 64 for n in lengths) >= 0.9 * len(lengths) and max(lengths) <= 2 * 256


@pytest.mark.parametrize("n", [0, 10**6])
def test_doc_paragraphs_count_is_checked(n):
    with pytest.raises(ValueError, match="n must be from 1"):
        sentences.doc_paragraphs(n)
