"""Semantic search over sentence embeddings: a persistent Index (exact, or approximate on FAISS), corpus reading,
cosine similarity and top-k, and the built-in corpus of `ctxkern search`."""
from __future__ import annotations

import torch
from torch import Tensor

from ctxkern.search.corpus import Corpus, read_corpus_file
from ctxkern.search.index import Hit, Index, IndexFormatError, model_identity

DEFAULT_CORPUS = (
    "Deep learning is a subfield of machine learning.",
    "Neural networks are inspired by the human brain.",
    "Transformers use attention to relate every word to every other word.",
    "A sentence embedding maps a sentence to a single vector.",
    "Semantic search finds documents by meaning rather than by keywords.",
    "Graphics processors run thousands of threads in parallel.",
    "The bank approved my loan application.",
    "I sat on the bank of the river.",
    "Interest rates at the central bank rose again this year.",
    "The river flooded the fields after the storm.",
    "A cat is sleeping on the warm windowsill.",
    "The dog chased the ball across the park.",
    "Paris is the capital of France.",
    "The Great Wall of China is visible from the mountains nearby.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The stock market fell sharply on Monday.",
    "She plays the violin in the city orchestra.",
    "Fresh bread smells wonderful in the morning.",
    "The football match ended in a draw.",
    "Vaccines train the immune system to recognize a virus.",
)


def read_corpus(path) -> list[str]:
    """One sentence per line (a path, or "-" for stdin); blank lines are skipped."""
    return read_corpus_file(path).texts


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities, in float32."""
    a, b = (torch.nn.functional.normalize(t.float(), dim=-1) for t in (a, b))
    return a @ b.T


def top_k(query: Tensor, corpus: Tensor, k: int) -> list[tuple[int, float]]:
    """The k corpus rows most similar to the query (D,): (index, cosine) pairs, best first."""
    scores = cosine_similarity_matrix(query[None], corpus)[0]
    best = scores.topk(min(k, len(scores)))
    return list(zip(best.indices.tolist(), best.values.tolist()))

__all__ = ["Corpus", "DEFAULT_CORPUS", "Hit", "Index", "IndexFormatError", "cosine_similarity_matrix", "model_identity",
           "read_corpus", "read_corpus_file", "top_k"]
