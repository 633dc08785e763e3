"""Word tokenizer and vocabulary, stored as a plain list of tokens."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation is dropped ("A dog's ball." -> a, dog's, ball)."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Token <-> id. Ids 0..3 are <pad> <bos> <eos> <unk>, then words by frequency."""

    def __init__(self, tokens: list[str]):
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not repeat a token")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad, self.bos, self.eos, self.unk = (self.index[t] for t in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5) -> Vocabulary:
        counts = Counter(w for c in captions for w in tokenize(c))
        # frequency first, then alphabetical: the same captions always give the same ids
        words = sorted((w for w, n in counts.items() if n >= min_freq),
                       key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def fingerprint(self) -> str:
        """sha256 of the tokens in id order: ties data built for one vocabulary (CIDEr-D's
        document frequencies) to it."""
        return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()

    def to_list(self) -> list[str]:
        return list(self.tokens)

    @classmethod
    def from_list(cls, tokens: list[str]) -> Vocabulary:
        return cls(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, max_words: int | None = None) -> list[int]:
        """<bos> w1 ... wn <eos>, with at most `max_words` words."""
        words = tokenize(text)[:max_words]
        return [self.bos] + [self.index.get(w, self.unk) for w in words] + [self.eos]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <eos>, specials other than <unk> dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i in (self.pad, self.bos):
                continue
            words.append(self.tokens[i])
        return " ".join(words)
