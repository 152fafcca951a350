"""What `ctxkern embed` prints: the cosine-similarity matrix with a line that says how to read it, and for
`--word` the sentence pairs ranked, each occurrence labelled by the words around it in its sentence."""
from __future__ import annotations

import re

CONTEXT_WORDS = 3       # words kept on each side of the compared word in its label


def print_similarity(similarity, sentences: list[str], word: str | None = None) -> None:
    """similarity: (N, N) cosine similarities of the sentences' embeddings (or of `word` in each sentence)."""
    what = f"the contextual embeddings of {word!r} in each sentence" if word else "the sentence embeddings"
    print(f"cosine similarity of {what} (row [i], column [j]: sentence i against sentence j; "
          "1 = same direction, 0 = unrelated):")
    print("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(sentences))))
    for i, row in enumerate(similarity.tolist()):
        print(f"{f'[{i}]':<5}" + "".join(f"{x:8.3f}" for x in row) + f"   {sentences[i]}")
    if word and len(sentences) > 1:
        _print_ranked_pairs(similarity, sentences, word)


def _print_ranked_pairs(similarity, sentences: list[str], word: str) -> None:
    labels = [context(s, word) for s in sentences]
    pairs = sorted(((similarity[i][j].item(), i, j) for i in range(len(sentences)) for j in range(i + 1, len(sentences))),
                   reverse=True)
    print(f"\n{word!r} in each pair of sentences, most alike first (the word in parentheses, with its neighbours):")
    for score, i, j in pairs:
        print(f"  {score:6.3f}  [{i}] {labels[i]}  ~  [{j}] {labels[j]}")
    score, i, j = pairs[-1]
    print(f"most different: {labels[i]!r} vs {labels[j]!r} (cosine {score:.3f})")


def context(sentence: str, word: str, width: int = CONTEXT_WORDS) -> str:
    """The word's first occurrence with `width` words either side, e.g. 'sat on the (bank) of the river'."""
    words = re.findall(r"\w+(?:'\w+)?", sentence)
    positions = [i for i, w in enumerate(words) if w.lower() == word.lower()]
    if not positions:
        return sentence
    at = positions[0]
    return " ".join(words[max(0, at - width):at] + [f"({words[at]})"] + words[at + 1:at + 1 + width])
