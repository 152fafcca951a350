"""Fixed English inputs for end-to-end encoder benchmarks, the same on every run and device: a mix of sentence
lengths made from the prose below, and long paragraphs of real text from Python's own documentation.

Sentence-embedding inputs are short queries, ordinary sentences and a few long passages, and a batch's speed
depends on that spread (padding, truncation), so the mix imitates it: a third of 4-12 words, most of 12-40,
a tail of 60-260 words, the longest past the model's 256 tokens. Each sentence is a span of the prose below
(written for this file), starting at a seeded random word.
"""
from __future__ import annotations

import random
from typing import Sequence

# Real documentation prose: a paragraph of at least this many words, of letters and spaces mostly, ending in a
# full stop, neither indented (code, grammar, lists) nor holding a prompt or a grammar rule.
DOC_MIN_WORDS = 50
DOC_MIN_LETTER_SHARE = 0.9

PASSAGES = (
    "The morning train leaves the valley a little after six, when the fog still lies low over the river and the "
    "fields on either side are grey and quiet. Most of the passengers are regulars who nod to one another without "
    "speaking, open a newspaper or a laptop, and settle into the same seats they took the day before. By the time "
    "the line climbs past the old quarry the sun has burned through, and the carriage fills with a warm yellow "
    "light that makes even the tired commuters look up from their screens for a moment.",

    "Baking bread at home takes patience more than skill. Flour, water, salt and a little yeast are mixed into a "
    "rough dough, which is left to rest until the gluten has formed on its own. A few folds during the first hours "
    "give it strength, and a long, cool rise overnight gives it flavour. In the morning the loaf is shaped, proofed "
    "once more and baked in a very hot oven, ideally inside a heavy pot whose lid traps the steam so that the crust "
    "can stretch before it sets.",

    "The town library moved into the former post office twenty years ago, and the building still keeps some of its "
    "old habits. The counter where stamps were sold now lends books, the sorting room holds the children's section, "
    "and a brass letter slot by the door has become the place to return novels after closing time. Volunteers run "
    "a reading group on Thursday evenings, and the discussions often continue long after the lights in the stacks "
    "have been switched off.",

    "A small vegetable garden can feed a family for much of the summer if it is planned with care. Tomatoes and "
    "beans need full sun and something to climb, lettuce prefers the cooler corners, and herbs such as thyme and "
    "rosemary are happy in poor, dry soil near the path. Watering early in the day keeps the leaves from scorching, "
    "while a layer of straw between the rows holds the moisture in and keeps most of the weeds away.",

    "Astronomers measure the distance to nearby stars by watching how their positions shift as the Earth travels "
    "around the Sun. The shift is tiny, far smaller than the width of a coin seen from across a city, but careful "
    "observations taken six months apart reveal it. From those angles and the known size of the Earth's orbit, "
    "simple geometry gives the distance, and that first rung supports every larger measurement of the universe "
    "that astronomers have built upon it since.",

    "Storms on this part of the coast arrive quickly in the autumn. The wind turns to the west in the afternoon, "
    "the fishing boats return early and are tied twice over in the harbour, and shopkeepers carry their signs "
    "indoors. By night the waves break over the sea wall and throw spray across the road, and the lighthouse beam "
    "sweeps through rain so heavy that it seems to stop a few metres from the glass.",

    "Learning a second language as an adult is slower than it is for children, but adults have advantages of their "
    "own. They can read grammar explanations, keep a notebook of useful phrases, and choose material that interests "
    "them, from cookbooks to football reports. What matters most is regular practice: twenty minutes every day does "
    "far more than a long session once a week, because memory is strengthened by returning to words just as they "
    "are about to be forgotten.",

    "Customer support teams increasingly search their past tickets before answering a new one. A short question "
    "about a failed payment, a forgotten password or a delayed delivery is compared with thousands of earlier "
    "conversations, and the closest matches suggest an answer that worked before. The quality of that search "
    "depends on how well the system understands meaning rather than exact wording, since two customers rarely "
    "describe the same problem in the same way.",

    "The museum's newest exhibition follows the history of timekeeping from sundials and water clocks to the "
    "atomic standards that now define the second. Visitors can watch a restored pendulum clock being wound, compare "
    "the accuracy of pocket watches from different centuries, and learn why railways were the first to insist that "
    "every town along a line keep the same time. The final room explains how satellites rely on clocks so precise "
    "that they must correct for the effects of relativity.",

    "Repairing an old bicycle is a good way to learn how machines work. The chain, the gears and the brakes can all "
    "be taken apart with a few simple tools, cleaned, adjusted and put back together in an afternoon. Worn cables "
    "and tyres are cheap to replace, and a drop of oil in the right places makes a surprising difference. When the "
    "wheels finally turn without a sound, the rider understands the bicycle in a way that no manual could teach.",
)

WORDS: tuple[str, ...] = tuple(" ".join(PASSAGES).split())

# (share of the sentences, fewest words, most words): query-like, ordinary, long passages.
LENGTH_MIX = ((1 / 3, 4, 12), (0.57, 12, 40), (0.10, 60, 260))


def realistic_word_counts(n: int, rng: random.Random) -> list[int]:
    """n word counts drawn from LENGTH_MIX (the shares rounded, the ordinary group taking the remainder),
    shuffled so that an encoder's own length sorting has work to do."""
    short, tail = round(n * LENGTH_MIX[0][0]), round(n * LENGTH_MIX[2][0])
    sizes = (short, n - short - tail, tail)
    counts = [rng.randint(lo, hi) for size, (_, lo, hi) in zip(sizes, LENGTH_MIX) for _ in range(size)]
    rng.shuffle(counts)
    return counts


def sentence_of(words: int, rng: random.Random) -> str:
    """A span of `words` words of the prose from a random start (wrapping around), capitalized, ending in a stop."""
    start = rng.randrange(len(WORDS))
    text = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(words))
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text.rstrip(",:;") + "."


def sentences_of_word_counts(counts: Sequence[int], seed: int = 0) -> list[str]:
    if any(c < 1 for c in counts):
        raise ValueError(f"counts must all be at least 1, got {min(counts)}")
    rng = random.Random(seed)
    return [sentence_of(c, rng) for c in counts]


def realistic_sentences(n: int = 256, seed: int = 0) -> list[str]:
    """The benchmark's sentences: the same n sentences for the same (n, seed) on every machine."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(seed)
    return [sentence_of(c, rng) for c in realistic_word_counts(n, rng)]


def _is_prose(paragraph: str) -> bool:
    if paragraph[:1].isspace() or any(mark in paragraph for mark in (">>>", "::=", "``")):
        return False
    text = " ".join(paragraph.split())
    letters = sum(c.isalpha() or c == " " for c in text)
    return text.endswith(".") and len(text.split()) >= DOC_MIN_WORDS and letters >= DOC_MIN_LETTER_SHARE * len(text)


def doc_paragraphs(n: int = 128) -> list[str]:
    """n paragraphs of real prose from the Python standard library's help topics (pydoc_data.topics, the text of
    `help("topics")`, written by Python's documentation authors; license: PSF License), line breaks joined:
    long inputs (n=128 on Python 3.11: 125 of 128 from 64 to 271 of all-MiniLM-L6-v2's tokens, median 94).
    Evenly spaced over the prose paragraphs of the topics in sorted order, so
    the same n on every run of one Python version (the topics change between Python releases)."""
    from pydoc_data.topics import topics

    # Some paragraphs recur under several topics: each is kept once, where it first appears.
    prose = list(dict.fromkeys(" ".join(p.split()) for name in sorted(topics) for p in topics[name].split("\n\n")
                               if _is_prose(p)))
    if not 1 <= n <= len(prose):
        raise ValueError(f"n must be from 1 to the {len(prose)} prose paragraphs of pydoc_data.topics, got {n}")
    return [prose[i * len(prose) // n] for i in range(n)]
