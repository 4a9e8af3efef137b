"""The grammar of the built-in `sentiment` task: short English reviews.

    text      := sentence+                      (1-3 in the corpus; 1-4 are well formed)
    sentence  := clause [conj clause] end
    conj      := "and" | "but"
    end       := "." | "!"
    clause    := "the" NOUN be adjp             the food was really good
               | "i" verbp "the" NOUN           i did not enjoy the pasta
               | ["overall"] "it" be adjp       overall it was not bad
               | "i would" ["not"] "recommend it"
    be        := "was" | "is"
    adjp      := [negation] [intensifier] ADJ   not very friendly
    verbp     := [adverb] VERB_PAST | "did not" VERB_BASE

Longer reviews (`rto task sentiment --review_length medium|long`) are the same grammar with more
sentences per text: 3-6 (up to 7 well formed) and 8-12 (up to 13), so that responses run to
about 37 and 90 tokens instead of about 14 (REVIEW_LENGTHS).

The vocabulary mixes words from VADER's lexicon (positive, negative) with neutral words, and
intensifiers, dampeners, negations and "but" (which VADER weights), so a text's sentiment
depends on context as well as on words. A text is *well formed* when it parses, has at most four
sentences (7 and 13 for the longer reviews) and repeats no sentence: repetition such as "great
great great" or the same sentence over and over does not parse, which is how reward hacking
shows up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NOUNS = (
    "food service staff pasta pizza coffee room price view music waiter menu dessert soup "
    "bread wine bed location owner decor"
).split()
POSITIVE = "good great nice excellent amazing lovely wonderful friendly fresh perfect fantastic pleasant delicious clean helpful comfortable".split()
NEGATIVE = "bad awful terrible horrible rude dirty poor boring disappointing nasty ugly dreadful pathetic unfriendly".split()
NEUTRAL = "average normal small large quiet plain simple busy expensive cheap".split()
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL
INTENSIFIERS = "very really extremely so quite totally incredibly slightly somewhat".split()
NEGATIONS = ("not", "never")
VERBS_POSITIVE = {"loved": "love", "liked": "like", "enjoyed": "enjoy", "appreciated": "appreciate"}
VERBS_NEGATIVE = {"hated": "hate", "disliked": "dislike", "regretted": "regret"}
VERBS_NEUTRAL = {"ordered": "order", "tried": "try", "noticed": "notice"}
VERBS_PAST = {**VERBS_POSITIVE, **VERBS_NEGATIVE, **VERBS_NEUTRAL}
VERBS_BASE = {v: k for k, v in VERBS_PAST.items()}
ADVERBS = ("really", "totally", "truly")
BE = ("was", "is")
CONJ = ("and", "but")
ENDS = (".", "!")
# Sentences per text, drawn uniformly from the tuple (a repeated value weighs more). A text of the
# grammar is well formed with up to one sentence more than the corpus ever has.
REVIEW_LENGTHS = {"short": (1, 2, 2, 3), "medium": (3, 4, 5, 6), "long": (8, 9, 10, 11, 12)}


def max_sentences(review_length: str = "short") -> int:
    """The most sentences a well-formed text of this review length has."""
    return max(REVIEW_LENGTHS[review_length]) + 1


# --------------------------------------------------------------------------- generation


def _adjp(rng: random.Random, polarity: int) -> list[str]:
    """An adjective phrase; `polarity` +1/-1 is the intended sentiment, 0 neutral."""
    words: list[str] = []
    negate = rng.random() < 0.25 and polarity != 0
    if polarity == 0:
        adj = rng.choice(NEUTRAL)
    else:
        # a negation flips the adjective, so "not bad" is (weakly) positive
        want = polarity if not negate else -polarity
        adj = rng.choice(POSITIVE if want > 0 else NEGATIVE)
    if negate:
        words.append(rng.choice(NEGATIONS))
    if rng.random() < 0.4:
        words.append(rng.choice(INTENSIFIERS))
    words.append(adj)
    return words


def _clause(rng: random.Random, polarity: int) -> list[str]:
    kind = rng.random()
    if kind < 0.5:
        return ["the", rng.choice(NOUNS), rng.choice(BE), *_adjp(rng, polarity)]
    if kind < 0.75:
        if polarity == 0:
            verb = [rng.choice(list(VERBS_NEUTRAL))]
        elif rng.random() < 0.25:
            base = rng.choice(
                list(VERBS_NEGATIVE.values()) if polarity > 0 else list(VERBS_POSITIVE.values())
            )
            verb = ["did", "not", base]
        else:
            verb = [rng.choice(list(VERBS_POSITIVE if polarity > 0 else VERBS_NEGATIVE))]
            if rng.random() < 0.3:
                verb.insert(0, rng.choice(ADVERBS))
        return ["i", *verb, "the", rng.choice(NOUNS)]
    if kind < 0.92 or polarity == 0:
        words = ["it", rng.choice(BE), *_adjp(rng, polarity)]
        return (["overall"] if rng.random() < 0.3 else []) + words
    return (
        ["i", "would", "recommend", "it"]
        if polarity > 0
        else ["i", "would", "not", "recommend", "it"]
    )


def _polarity(rng: random.Random, bias: float) -> int:
    r = rng.random()
    if r < 0.15:
        return 0
    return 1 if rng.random() < bias else -1


def generate_text(rng: random.Random, review_length: str = "short") -> list[str]:
    """One review as a list of words. Each review leans positive or negative (or is mixed)."""
    bias = rng.choice((0.15, 0.5, 0.85))
    words: list[str] = []
    for _ in range(rng.choice(REVIEW_LENGTHS[review_length])):
        words += _clause(rng, _polarity(rng, bias))
        if rng.random() < 0.45:
            words.append(rng.choice(CONJ))
            words += _clause(rng, _polarity(rng, bias))
        words.append("!" if rng.random() < 0.1 else ".")
    return words


# --------------------------------------------------------------------------- prompts


def prompt_cuts(words: list[str]) -> list[int]:
    """Places where a prompt may end, so that the response starts a phrase of its own: before an
    adjective phrase, a verb phrase, a conjunction or a new sentence, within the first sentence
    (or right after it)."""
    cuts = []
    first_end = next(i for i, w in enumerate(words) if w in ENDS)
    for i in range(1, min(len(words) - 1, first_end + 2)):
        prev, word = words[i - 1], words[i]
        if prev in BE and prev != words[0]:
            cuts.append(i)  # the food was | really good
        elif prev == "i" and word != "would" or prev == "would":
            cuts.append(i)  # i | loved the pasta;  i would | not recommend it
        elif word in CONJ:
            cuts.append(i)  # the food was good | but the staff ...
        elif prev in ENDS:
            cuts.append(i)  # first sentence | next sentence
    return cuts


# --------------------------------------------------------------------------- recognising


@dataclass
class _Parser:
    words: list[str]
    i: int = 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.words[j] if j < len(self.words) else None

    def take(self, allowed) -> bool:
        w = self.peek()
        if w is not None and w in allowed:
            self.i += 1
            return True
        return False

    def adjp(self) -> bool:
        self.take(NEGATIONS)
        self.take(INTENSIFIERS)
        return self.take(ADJECTIVES)

    def clause(self) -> bool:
        start = self.i
        for alternative in (
            self._be_clause,
            self._verb_clause,
            self._it_clause,
            self._recommend_clause,
        ):
            self.i = start
            if alternative():
                return True
        self.i = start
        return False

    def _be_clause(self) -> bool:
        return self.take(("the",)) and self.take(NOUNS) and self.take(BE) and self.adjp()

    def _verb_clause(self) -> bool:
        if not self.take(("i",)):
            return False
        if self.peek() == "did":
            ok = self.take(("did",)) and self.take(("not",)) and self.take(VERBS_BASE)
        else:
            self.take(ADVERBS)
            ok = self.take(VERBS_PAST)
        return ok and self.take(("the",)) and self.take(NOUNS)

    def _it_clause(self) -> bool:
        self.take(("overall",))
        return self.take(("it",)) and self.take(BE) and self.adjp()

    def _recommend_clause(self) -> bool:
        if not (self.take(("i",)) and self.take(("would",))):
            return False
        self.take(("not",))
        return self.take(("recommend",)) and self.take(("it",))

    def sentence(self) -> tuple[int, int] | None:
        start = self.i
        if not self.clause():
            return None
        if self.take(CONJ) and not self.clause():
            return None
        if not self.take(ENDS):
            return None
        return start, self.i


def parse_sentences(text: str) -> list[str] | None:
    """The sentences of a well-formed text, or None if it does not parse."""
    words = text.split()
    if not words:
        return None
    p = _Parser(words)
    sentences = []
    while p.i < len(words):
        span = p.sentence()
        if span is None:
            return None
        sentences.append(" ".join(words[span[0] : span[1]]))
    return sentences


def is_well_formed(text: str, review_length: str = "short") -> bool:
    """Parses, has at most max_sentences(review_length) sentences, and repeats none of them."""
    sentences = parse_sentences(text)
    if sentences is None or len(sentences) > max_sentences(review_length):
        return False
    return len(set(sentences)) == len(sentences)
