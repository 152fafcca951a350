"""The query encoder an index stores (ctxkern/search/query_encoder.py) and the torch-free `ctxkern search --index`
of _ctxkern_cli: its embeddings against SentenceEncoder.encode and sentence-transformers, its output against the
torch path's, no torch imported, the fallbacks (no query encoder stored, options it does not serve) and the
numpy exact search against torch's."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from helpers import bundled_model_folder
from ctxkern.models import SentenceEncoder
from ctxkern.search import DEFAULT_CORPUS, Index, IndexFormatError, query_encoder
from ctxkern.search import index as index_module

pytest.importorskip("onnxruntime", reason="the query encoder runs on ONNX Runtime (requirements.txt installs it)")
pytest.importorskip("onnx", reason="the query encoder is written with onnx (requirements.txt installs it)")

QUERIES = ["How do neural networks learn?", "money and loans", "a river in flood", "東京の天気",
           "Where does money come from? " * 3]


@pytest.fixture(scope="module")
def encoder():
    bundled_model_folder()
    return SentenceEncoder.from_pretrained()


@pytest.fixture(scope="module")
def saved_index(encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "ix"
    index = Index.build(list(DEFAULT_CORPUS), encoder)
    index.save(path, encoder=encoder)
    assert index.query_encoder_note is None
    return path


def test_the_stored_encoder_matches_sentence_encoder_and_sentence_transformers(encoder, saved_index):
    ours = query_encoder.QueryEncoder(saved_index / "query").encode(QUERIES)
    torch_path = encoder.encode(QUERIES, convert_to_numpy=True)
    assert ours.shape == torch_path.shape == (len(QUERIES), 384) and ours.dtype == np.float32
    assert np.abs(ours - torch_path).max() < 1e-5
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(bundled_model_folder()), device="cpu").encode(QUERIES, convert_to_numpy=True)
    assert np.abs(ours - st).max() < 1e-5


def test_the_query_folder_is_listed_and_size_checked(saved_index, tmp_path):
    meta = json.loads((saved_index / "index.json").read_text())
    assert set(query_encoder.FILES) <= set(meta["files"])
    assert Index.load(saved_index).query_folder == saved_index / "query"
    import shutil

    shutil.copytree(saved_index, tmp_path / "ix")
    with open(tmp_path / "ix" / "query" / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IndexFormatError, match=r"query/model\.onnx\.data is 1000 bytes"):
        Index.load(tmp_path / "ix")


def launcher(*args, check_no_torch: bool = True) -> subprocess.CompletedProcess:
    """`ctxkern ARGS` as the console script runs it (_ctxkern_cli.main), in a fresh process; with
    check_no_torch, the process fails unless it ended without importing torch."""
    code = ("import sys, _ctxkern_cli\n"
            f"rc = _ctxkern_cli.main({list(args)!r})\n"
            + ("assert 'torch' not in sys.modules, 'torch was imported'\n" if check_no_torch else "")
            + "sys.exit(rc)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def full_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxkern", *args], capture_output=True, text=True, timeout=300)


def test_search_without_torch_prints_what_the_torch_path_prints(saved_index):
    for query in ("Where does money come from?", "cats and dogs", "bank " * 400):
        args = ("search", "--index", str(saved_index), "--query", query, "--top", "4")
        light, full = launcher(*args), full_cli(*args)
        assert light.returncode == 0 and full.returncode == 0, light.stderr + full.stderr
        assert light.stdout.splitlines()[0] == full.stdout.splitlines()[0]
        hits = [[(line.split()[0], line.split(" line ", 1)[1]) for line in p.stdout.splitlines()[1:]]
                for p in (light, full)]
        assert [h[1] for h in hits[0]] == [h[1] for h in hits[1]]        # the same lines, in the same order
        assert np.allclose([float(s) for s, _ in hits[0]], [float(s) for s, _ in hits[1]], atol=2e-4)
        assert light.stderr == full.stderr               # the note on a query past the model's limit


@pytest.mark.parametrize("name, content", [("config.json", b"{not json"), ("tokenizer.json", b"[]"),
                                           ("model.onnx", b"\x00" * 64)])
def test_a_damaged_query_encoder_file_is_named(saved_index, tmp_path, name, content):
    import shutil

    shutil.copytree(saved_index, tmp_path / "ix")
    (tmp_path / "ix" / "query" / name).write_bytes(content)
    with pytest.raises(IndexFormatError, match=rf"query/{name}: unreadable query encoder file"):
        query_encoder.QueryEncoder(tmp_path / "ix" / "query")


def test_the_launcher_hands_everything_else_to_the_full_cli(saved_index, tmp_path):
    # Options the light path does not serve, and an index without a query encoder, take the torch path.
    proc = launcher("search", "--index", str(saved_index), "--query", "bank", "--backend", "torch",
                    check_no_torch=False)
    assert proc.returncode == 0 and "line 7: The bank approved my loan application." in proc.stdout
    index = Index.load(saved_index)
    index.query_folder = None
    index.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "query").exists()
    proc = launcher("search", "--index", str(tmp_path / "plain"), "--query", "bank", check_no_torch=False)
    assert proc.returncode == 0 and "line 7: The bank approved my loan application." in proc.stdout
    assert launcher("--version", check_no_torch=False).stdout.startswith("ctxkern ")
    bad = launcher("search", "--index", str(tmp_path / "missing"), "--query", "x", check_no_torch=False)
    assert bad.returncode == 2 and "no such folder" in bad.stderr
    assert launcher("search", "--index", str(saved_index), "--query", "x", "--top", "0").returncode == 2
    no_index = launcher("search", "--query", "x", "--approximate", check_no_torch=False)
    assert no_index.returncode == 2 and "--approximate needs --index" in no_index.stderr
    info = full_cli("index", "info", str(saved_index))
    assert "query encoder: stored (ONNX)" in info.stdout, info.stdout + info.stderr
    assert "query encoder: none" in full_cli("index", "info", str(tmp_path / "plain")).stdout


def test_a_loaded_index_keeps_its_query_encoder_when_saved_again_and_merged(saved_index, tmp_path):
    index = Index.load(saved_index)
    index.save(tmp_path / "again")
    merged = Index.merge([Index.load(saved_index), Index.load(tmp_path / "again")])
    merged.save(tmp_path / "merged")
    for folder in ("again", "merged"):
        assert (tmp_path / folder / "query" / "model.onnx.data").is_file()
        assert Index.load(tmp_path / folder).query_folder is not None


def test_what_cannot_be_exported_is_said():
    plain = dict(transformer_folder="x", tokenizer=None, pooling="mean", prompts={}, default_prompt_name=None)
    assert query_encoder.unavailable_reason(types.SimpleNamespace(**plain)) is None
    assert "prompts" in query_encoder.unavailable_reason(
        types.SimpleNamespace(**{**plain, "prompts": {"query": "query: "}, "default_prompt_name": "query"}))
    assert "pooling 'max'" in query_encoder.unavailable_reason(types.SimpleNamespace(**{**plain, "pooling": "max"}))
    assert "folder" in query_encoder.unavailable_reason(types.SimpleNamespace(pooling="mean"))


def test_cli_build_can_leave_the_query_encoder_out(tmp_path):
    corpus = "\n".join(DEFAULT_CORPUS[:4])
    proc = subprocess.run([sys.executable, "-m", "ctxkern", "index", "build", "-", "--out", str(tmp_path / "ix"),
                           "--no-query-encoder", "--no-progress"], input=corpus, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "ix" / "query").exists()


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_numpy_exact_search_equals_torch_exact_search(metric, monkeypatch):
    rng = np.random.default_rng(0)
    index = Index(48, metric=metric)
    index.add([f"doc {i}" for i in range(3000)], rng.standard_normal((3000, 48)).astype(np.float32))
    queries = rng.standard_normal((300, 48)).astype(np.float32)     # more than one QUERY_CHUNK
    with_torch = index.search_embeddings(queries, 7, exact=True)
    monkeypatch.setattr(index_module, "_torch_if_imported", lambda: None)   # as in a process without torch
    without = index.search_embeddings(queries, 7, exact=True)
    assert np.array_equal(with_torch[1], without[1])
    assert np.allclose(with_torch[0], without[0], rtol=1e-5, atol=1e-5)
    assert index_module.QUERY_CHUNK < len(queries)


def test_a_query_that_is_not_utf8_is_named_on_both_paths(saved_index):
    # The shell hands Python bytes it cannot decode as surrogates ("caf\udcff" for b"caf\xff").
    light = launcher("search", "--index", str(saved_index), "--query", "caf\udcff")
    full = subprocess.run([sys.executable, "-m", "ctxkern", "search", "--index", str(saved_index), "--query",
                           b"caf\xff"], capture_output=True, text=True, timeout=300)
    for proc in (light, full):
        assert proc.returncode == 2 and "--query is not UTF-8 text (byte b'\\xff' at character 3)" in proc.stderr
