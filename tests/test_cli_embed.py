"""`ctxkern embed` and `ctxkern search` on the bundled model, their printed numbers against sentence-transformers."""
import re
import subprocess
import sys

import pytest
import torch

from helpers import bundled_model_folder
from ctxkern.search import DEFAULT_CORPUS

POLYSEMY = ["The bank approved my loan application.", "I sat on the bank of the river.",
            "Please bank the fire before leaving."]


def ctxkern_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxkern", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True, scope="module")
def _bundled_model():
    bundled_model_folder()


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_model_folder()), device="cpu")


def st_cosines(model, a, b):
    from sentence_transformers import util

    return util.cos_sim(model.encode(a, convert_to_tensor=True), model.encode(b, convert_to_tensor=True))


def printed_matrix(stdout: str, n: int) -> torch.Tensor:
    rows = [line for line in stdout.splitlines() if re.match(r"\[\d+\]\s", line)]
    assert len(rows) == n, stdout
    return torch.tensor([[float(x) for x in row.split()[1:n + 1]] for row in rows])


def test_embed_prints_the_cosine_matrix_of_sentence_transformers(sentence_transformer):
    proc = ctxkern_cli("embed", *POLYSEMY)
    assert proc.returncode == 0, proc.stderr
    printed = printed_matrix(proc.stdout, 3)
    expected = st_cosines(sentence_transformer, POLYSEMY, POLYSEMY)
    assert (printed - expected).abs().max() <= 6e-4, f"{printed}\n!=\n{expected}"
    for sentence in POLYSEMY:
        assert sentence in proc.stdout


def test_embed_word_tells_the_money_bank_from_the_river_bank():
    sentences = [*POLYSEMY[:2], "Interest rates at the central bank rose again this year."]
    proc = ctxkern_cli("embed", "--word", "bank", *sentences)
    assert proc.returncode == 0, proc.stderr
    sim = printed_matrix(proc.stdout, 3)
    assert torch.allclose(sim.diagonal(), torch.ones(3)) and torch.allclose(sim, sim.T)
    assert sim[0, 2] > sim[0, 1], f"loan bank should be nearer the central bank than the river bank:\n{sim}"


def test_search_ranks_the_built_in_corpus_like_sentence_transformers(sentence_transformer):
    query = "What is deep learning?"
    proc = ctxkern_cli("search", "--query", query, "--top", "3")
    assert proc.returncode == 0, proc.stderr
    hits = re.findall(r"^\s*(-?\d\.\d{4})  (.+)$", proc.stdout, re.MULTILINE)
    assert len(hits) == 3, proc.stdout
    assert hits[0][1] == "Deep learning is a subfield of machine learning."
    scores = st_cosines(sentence_transformer, [query], list(DEFAULT_CORPUS))[0]
    expected = scores.topk(3)
    assert [s for _, s in hits] == [DEFAULT_CORPUS[i] for i in expected.indices.tolist()]
    assert torch.allclose(torch.tensor([float(x) for x, _ in hits]), expected.values, atol=1e-4)


def test_search_reads_a_corpus_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sleeps on the sofa.\n\nStock prices fell today.\nA kitten naps on the couch.\n")
    proc = ctxkern_cli("search", "--query", "a sleeping cat", "--corpus", str(corpus), "--top", "10")
    assert proc.returncode == 0, proc.stderr
    hits = re.findall(r"^\s*-?\d\.\d{4}  (.+)$", proc.stdout, re.MULTILINE)
    assert len(hits) == 3 and hits[-1] == "Stock prices fell today."


@pytest.mark.parametrize("args,message", [
    (("search", "--query", "x", "--top", "0"), "--top must be at least 1"),
    (("search", "--query", "x", "--corpus", "/nonexistent/corpus.txt"), "/nonexistent/corpus.txt"),
    (("embed", "a sentence", "--model", "/nonexistent/model"), "/nonexistent/model"),
    (("embed", "--word", "bank", "no such word here"), "word 'bank' is not in sentence 0"),
    (("embed", "a sentence", "--device", "tpu"), "device 'tpu' is not a torch device"),
])
def test_bad_arguments_give_a_clear_error(args, message):
    proc = ctxkern_cli(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    proc = ctxkern_cli("embed", "a sentence", "--device", "cuda")
    assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr, proc.stderr


def test_embed_word_ranks_the_pairs_and_names_the_most_different():
    sentences = [*POLYSEMY[:2], "Interest rates at the central bank rose again this year."]
    proc = ctxkern_cli("embed", "--word", "bank", *sentences)
    assert proc.returncode == 0, proc.stderr
    sim = printed_matrix(proc.stdout, 3)
    pairs = re.findall(r"^\s+(-?\d\.\d{3})  \[(\d)\] .+  ~  \[(\d)\] ", proc.stdout, re.MULTILINE)
    assert len(pairs) == 3, proc.stdout
    for score, i, j in pairs:
        assert abs(float(score) - sim[int(i), int(j)].item()) <= 1e-3
    assert [float(s) for s, _, _ in pairs] == sorted((float(s) for s, _, _ in pairs), reverse=True)
    _, i, j = pairs[-1]
    labels = {"0": "'The (bank) approved my loan'", "1": "'sat on the (bank) of the river'",
              "2": "'at the central (bank) rose again this'"}
    assert f"most different: {labels[i]} vs {labels[j]}" in proc.stdout, proc.stdout
    assert "1 = same direction, 0 = unrelated" in proc.stdout
