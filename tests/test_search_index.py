"""ctxkern.search.Index: its results against sentence-transformers' semantic_search and a float64 brute force,
saving and loading (atomic, size-checked, versioned), the model check, corpus reading, FAISS' approximate
index (recall@10 against exact), and the `ctxkern index` / `ctxkern search --index` commands."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import bundled_model_folder
from ctxkern.models import SentenceEncoder
from ctxkern.search import DEFAULT_CORPUS, Index, IndexFormatError, read_corpus_file
from ctxkern.search import index as index_module
from test_sentence_encoder import small_bert  # noqa: F401

QUERIES = ["How do neural networks learn?", "money and loans", "a river in flood", "music", "東京の天気"]


@pytest.fixture(scope="module")
def encoder():
    bundled_model_folder()
    return SentenceEncoder.from_pretrained()


@pytest.fixture(scope="module")
def corpus_index(encoder):
    return Index.build(list(DEFAULT_CORPUS), encoder)


def unit_rows(n, d=32, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_index(n, d=32, **kw):
    index = Index(d, **kw)
    index.add([f"doc {i}" for i in range(n)], unit_rows(n, d))
    return index


# ----------------------------------------------------------------------------- search results

def test_ranking_matches_sentence_transformers_semantic_search(corpus_index, encoder):
    from sentence_transformers import SentenceTransformer, util

    st = SentenceTransformer(str(bundled_model_folder()), device="cpu")
    theirs = util.semantic_search(st.encode(QUERIES, convert_to_tensor=True),
                                  st.encode(list(DEFAULT_CORPUS), convert_to_tensor=True), top_k=5)
    ours = corpus_index.search(QUERIES, k=5, encoder=encoder)
    for mine, reference in zip(ours, theirs):
        assert [h.id for h in mine] == [r["corpus_id"] for r in reference]
        assert np.allclose([h.score for h in mine], [r["score"] for r in reference], atol=1e-5)
        assert all(h.text == DEFAULT_CORPUS[h.id] and h.line == h.id + 1 for h in mine)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_exact_search_against_float64_brute_force(metric):
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((777, 24)).astype(np.float32)
    queries = rng.standard_normal((300, 24)).astype(np.float32)     # more than one chunk of queries
    index = Index(24, metric=metric)
    index.add([str(i) for i in range(777)], corpus)
    index_module.QUERY_CHUNK, chunk = 128, index_module.QUERY_CHUNK
    try:
        scores, ids = index.search_embeddings(queries, k=7)
    finally:
        index_module.QUERY_CHUNK = chunk
    c, q = corpus.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        c, q = c / np.linalg.norm(c, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    reference = q @ c.T
    assert (ids == np.argsort(-reference, axis=1)[:, :7]).all()
    assert np.allclose(scores, np.take_along_axis(reference, ids, 1), atol=1e-5)


def test_k_larger_than_the_index_and_bad_k():
    index = random_index(5)
    scores, ids = index.search_embeddings(unit_rows(3, seed=9), k=10)
    assert scores.shape == ids.shape == (3, 5)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search_embeddings(unit_rows(1), k=k)
    with pytest.raises(ValueError, match=r"queries must be floating-point \(N, 32\)"):
        index.search_embeddings(np.ones((2, 31), np.float32))
    with pytest.raises(ValueError, match="text queries need the encoder"):
        index.search("text")


# ----------------------------------------------------------------------------- saving and loading

def test_save_load_round_trip_and_add(corpus_index, encoder, tmp_path):
    corpus_index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert loaded.search(QUERIES, k=4, encoder=encoder) == corpus_index.search(QUERIES, k=4, encoder=encoder)
    loaded.add(["Déjà vu — a naïve café 🙂"], encoder=encoder)
    assert loaded.texts[-1] == "Déjà vu — a naïve café 🙂" and loaded.lines[-1] == len(DEFAULT_CORPUS) + 1
    loaded.save(tmp_path / "ix")                      # replaces the index it was loaded from
    again = Index.load(tmp_path / "ix")
    assert len(again) == len(DEFAULT_CORPUS) + 1 and again.text(len(DEFAULT_CORPUS)) == "Déjà vu — a naïve café 🙂"
    assert [p.name for p in tmp_path.iterdir()] == ["ix"], "no temporary folder is left behind"


def test_another_model_is_refused_by_name(corpus_index, encoder, small_bert, tmp_path):
    other = SentenceEncoder.from_pretrained(small_bert)
    with pytest.raises(ValueError, match=r"built with model 'all-MiniLM-L6-v2 \(bundled\)', not '.*small_bert"):
        corpus_index.search("a query", encoder=other)
    fresh = Index(encoder.dim)                       # no model yet: the first encoder added with becomes it
    fresh.add(["a text"], encoder=encoder)
    assert fresh.model["name"] == "all-MiniLM-L6-v2 (bundled)"
    with pytest.raises(ValueError, match="built with model"):
        fresh.add(["more"], encoder=other)


def test_interrupted_save_leaves_the_previous_index(tmp_path, monkeypatch):
    random_index(10).save(tmp_path / "ix")
    real_save = np.save

    def interrupted(path, array, *args, **kw):
        if str(path).endswith("texts.offsets.npy"):
            raise KeyboardInterrupt
        real_save(path, array, *args, **kw)

    monkeypatch.setattr(index_module.np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        random_index(20).save(tmp_path / "ix")
    monkeypatch.undo()
    assert len(Index.load(tmp_path / "ix")) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]


def test_a_folder_left_by_a_killed_build_is_not_an_index(tmp_path):
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "embeddings.npy").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match="no index.json"):
        Index.load(tmp_path / "ix")
    with pytest.raises(ValueError, match="is not a ctxkern index: not replacing it"):
        random_index(3).save(tmp_path / "ix")


@pytest.mark.parametrize("damage,message", [
    ("truncate:embeddings.npy", r"embeddings.npy is \d+ bytes, index.json says \d+ \(truncated"),
    ("remove:texts.jsonl", "texts.jsonl is missing"),
    ("version", "index format version 99, this ctxkern reads version 1"),
    ("format", "not a ctxkern index"),
    ("json", "index.json: not valid JSON"),
])
def test_damaged_index_is_named(tmp_path, damage, message):
    path = random_index(10).save(tmp_path / "ix")
    meta_path = path / "index.json"
    meta = json.loads(meta_path.read_text())
    kind, _, name = damage.partition(":")
    if kind == "truncate":
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:len(data) // 2])
    elif kind == "remove":
        (path / name).unlink()
    elif kind == "json":
        meta_path.write_text("{")
    else:
        meta_path.write_text(json.dumps(meta | ({"version": 99} if kind == "version" else {"format": "other"})))
    with pytest.raises(IndexFormatError, match=message):
        Index.load(path)


# ----------------------------------------------------------------------------- corpora

def test_corpus_lines_empty_lines_and_stdin(tmp_path):
    data = "first\n\n  second  \r\n   \nthird".encode()
    (tmp_path / "c.txt").write_bytes(data)
    for corpus in (read_corpus_file(tmp_path / "c.txt"), read_corpus_file("-", stdin=io.BytesIO(data))):
        assert corpus.texts == ["first", "second", "third"] and corpus.lines == [1, 3, 5] and corpus.skipped == 2


def test_corpus_jsonl_field(tmp_path):
    rows = [{"text": "a", "id": 1}, {}, {"text": " "}, {"text": "b"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) if r else "" for r in rows))
    corpus = read_corpus_file(tmp_path / "c.jsonl", jsonl_field="text")
    assert corpus.texts == ["a", "b"] and corpus.lines == [1, 4] and corpus.skipped == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"title": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: no field 'text'"):
        read_corpus_file(tmp_path / "bad.jsonl", jsonl_field="text")
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"line 1: field 'text' is a int, not a string"):
        read_corpus_file(tmp_path / "num.jsonl", jsonl_field="text")


def test_corpus_errors_name_the_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: not UTF-8"):
        read_corpus_file(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"holds no document \(2 empty lines skipped"):
        read_corpus_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_corpus_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- FAISS

def test_faiss_hnsw_recall_at_10_and_round_trip(tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (the optional [search] extra)")
    n, d = 4000, 48
    approximate = random_index(n, d, faiss="HNSW32", faiss_params="efSearch=128")
    exact = random_index(n, d)
    queries = unit_rows(200, d, seed=5)
    _, exact_ids = exact.search_embeddings(queries, 10)
    _, ids = approximate.search_embeddings(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert recall >= 0.95, f"recall@10 {recall:.3f}"
    loaded = Index.load(approximate.save(tmp_path / "ix"))
    assert loaded.faiss_spec == "HNSW32" and (loaded.search_embeddings(queries, 10)[1] == ids).all()


def test_faiss_ivf_is_trained_on_its_first_add_and_bad_specs_are_named():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (the optional [search] extra)")
    index = random_index(500, faiss="IVF8,Flat", faiss_params="nprobe=8")     # every list probed: exact
    _, exact_ids = random_index(500).search_embeddings(unit_rows(20, seed=3), 5)
    assert (index.search_embeddings(unit_rows(20, seed=3), 5)[1] == exact_ids).all()
    with pytest.raises(ValueError, match="faiss index 'NoSuchIndex7'"):
        Index(32, faiss="NoSuchIndex7")
    with pytest.raises(ValueError, match="faiss parameters 'nosuch=3'"):
        Index(32, faiss="HNSW32", faiss_params="nosuch=3")


# ----------------------------------------------------------------------------- the commands

def ctxkern_cli(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxkern", *args], capture_output=True, timeout=300,
                          input=stdin)


def test_cli_build_from_stdin_then_search_prints_line_numbers(tmp_path):
    corpus = "\n".join(["The bank approved my loan.", "", "I sat on the bank of the river.",
                        "Neural networks learn by gradient descent."]).encode()
    build = ctxkern_cli("index", "build", "-", "--out", str(tmp_path / "ix"), stdin=corpus)
    assert build.returncode == 0, build.stderr.decode()
    assert "3 documents, 1 empty lines skipped" in build.stdout.decode()
    search = ctxkern_cli("search", "--index", str(tmp_path / "ix"), "--query", "How do neural networks learn?",
                         "--top", "2")
    assert search.returncode == 0, search.stderr.decode()
    first = [line for line in search.stdout.decode().splitlines() if "line " in line][0]
    assert first.split("line 4: ")[1] == "Neural networks learn by gradient descent."


def test_cli_errors_name_the_file_or_line(tmp_path, small_bert, corpus_index):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xfe\n")
    bad = ctxkern_cli("index", "build", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "ix"))
    assert bad.returncode == 2 and "line 2: not UTF-8" in bad.stderr.decode()
    assert not (tmp_path / "ix").exists()
    corpus_index.save(tmp_path / "ix")
    other = ctxkern_cli("search", "--index", str(tmp_path / "ix"), "--query", "x", "--model", str(small_bert))
    assert other.returncode == 2 and "built with model 'all-MiniLM-L6-v2 (bundled)'" in other.stderr.decode()


def test_an_elmo_model_is_refused_by_the_index_commands_with_the_reason(tmp_path, corpus_index):
    fixtures = Path(__file__).parent / "fixtures" / "elmo"
    elmo = f"elmo:{fixtures / 'options.json'},{fixtures / 'lm_weights.hdf5'}"
    corpus_index.save(tmp_path / "ix")
    for args in (("index", "build", "-", "--out", str(tmp_path / "new"), "--model", elmo),
                 ("search", "--index", str(tmp_path / "ix"), "--query", "x", "--model", elmo)):
        proc = ctxkern_cli(*args, stdin=b"a sentence\n")
        assert proc.returncode == 2, proc.stderr.decode()
        assert "an ELMo model embeds words" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()


def test_a_query_past_the_model_limit_is_truncated_and_said(corpus_index, tmp_path, capsys):
    from ctxkern import cli

    corpus_index.save(tmp_path / "ix")
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["search", "--index", str(tmp_path / "ix"), "--query", "bank " * 400, "--top", "2"])
    finally:
        torch.set_num_threads(threads)             # the query path runs on one thread
    out = capsys.readouterr()
    assert rc == 0 and "reaches the model's limit of 256 tokens" in out.err
    assert len([line for line in out.out.splitlines() if " line " in line]) == 2
