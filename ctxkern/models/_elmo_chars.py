"""ELMo's character ids, as AllenNLP's ELMoCharacterMapper and batch_to_ids make them.

A token is its UTF-8 bytes (0-255), cut to 48 bytes (even inside a multi-byte character, as AllenNLP cuts),
between a begin-of-word (258) and an end-of-word (259) character and padded with 260 to 50 characters; the
sentence-boundary tokens <S> and </S> are the begin / end-of-sentence characters (256 / 257) between those
word markers. Every id is then shifted by 1 so that 0 is free for padding tokens: a padded position of a
shorter sentence is 50 zeros, which is how the model tells tokens from padding.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

MAX_WORD_LENGTH = 50
BEGINNING_OF_SENTENCE = 256
END_OF_SENTENCE = 257
BEGINNING_OF_WORD = 258
END_OF_WORD = 259
PADDING = 260
BOS_TOKEN = "<S>"
EOS_TOKEN = "</S>"


def _boundary_ids(character: int) -> list[int]:
    ids = [PADDING] * MAX_WORD_LENGTH
    ids[:3] = [BEGINNING_OF_WORD, character, END_OF_WORD]
    return [c + 1 for c in ids]


BOS_CHARACTERS = _boundary_ids(BEGINNING_OF_SENTENCE)  # the +1-shifted ids of the sentence-start token
EOS_CHARACTERS = _boundary_ids(END_OF_SENTENCE)


def word_to_char_ids(word: str) -> list[int]:
    """The 50 character ids (shifted by 1) of one token. "" is a real token: just the two word markers."""
    if not isinstance(word, str):
        raise TypeError(f"a token must be a str, got {type(word).__name__} ({word!r})")
    if word == BOS_TOKEN:
        return list(BOS_CHARACTERS)
    if word == EOS_TOKEN:
        return list(EOS_CHARACTERS)
    encoded = word.encode("utf-8", "ignore")[:MAX_WORD_LENGTH - 2]
    ids = [BEGINNING_OF_WORD, *encoded, END_OF_WORD]
    ids += [PADDING] * (MAX_WORD_LENGTH - len(ids))
    return [c + 1 for c in ids]


def batch_to_ids(sentences: Sequence[Sequence[str]]) -> Tensor:
    """Tokenized sentences -> LongTensor (B, T, 50) of character ids, T the longest sentence; padding tokens are 0.

    An empty sentence is a row of padding; a batch of only empty sentences gives T = 0. The biLM adds the
    sentence-boundary tokens itself.
    """
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise TypeError(f"sentences must be a list of tokenized sentences (lists of str), got "
                        f"{type(sentences).__name__}")
    for i, sentence in enumerate(sentences):
        if isinstance(sentence, str) or not isinstance(sentence, Sequence):
            raise TypeError(f"sentences[{i}] must be a list of str tokens, got {type(sentence).__name__} "
                            f"(split the sentence into tokens first)")
    longest = max((len(s) for s in sentences), default=0)
    ids = torch.zeros((len(sentences), longest, MAX_WORD_LENGTH), dtype=torch.long)
    for i, sentence in enumerate(sentences):
        if sentence:
            ids[i, :len(sentence)] = torch.tensor([word_to_char_ids(w) for w in sentence], dtype=torch.long)
    return ids
