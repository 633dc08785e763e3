"""What a caption may say and how its words are chosen: `DecodeOptions` (the user's), `Rules`
(banned words, n-gram blocking, minimum length), `Sampling` (temperature, top-k, top-p) and
`AttentionSpec` (which maps to keep).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arrays import Array, array_ops

# -----------------------------------------------------------------------------
# what a caption may say, how the next word is chosen, which attention is kept

FUNCTION_WORDS = ("a", "an", "the", "of", "on", "in", "with", "and")


@dataclass
class Rules:
    """The logits processors every search applies before choosing a word.

    Never <pad> or <bos> (neither is ever a word); no <eos> before `min_words` words, nor right
    after a word of `banned_endings` (function words: a caption never stops on "a"), and no such
    word as the last of `max_words` (a caption cut at the limit does not end on "a" either); with
    `no_repeat_ngram_size` n, no word that would repeat an n-gram already in the caption.
    """
    pad: int
    bos: int
    eos: int
    min_words: int = 0
    no_repeat_ngram_size: int = 0
    banned_endings: frozenset[int] = frozenset()
    max_words: int = 0                  # 0: no limit known to the rules

    def apply(self, logits: Array, words: list[list[int]]) -> Array:
        """logits (N, V) of the word after each row's `words` -> a float32 copy, banned at -inf."""
        logits = array_ops(logits).cast(logits, "float32")
        logits[:, [self.pad, self.bos]] = float("-inf")
        rows, banned = [], []
        for i, ws in enumerate(words):
            ban = self._banned(ws)
            rows += [i] * len(ban)
            banned += ban
        if rows:
            logits[rows, banned] = float("-inf")
            stuck = (logits == float("-inf")).all(-1)      # everything banned (a tiny vocabulary)
            if stuck.any():
                logits[stuck, self.eos] = 0.0
        return logits

    def _banned(self, words: list[int]) -> list[int]:
        ban = []
        if len(words) < self.min_words or (words and words[-1] in self.banned_endings):
            ban.append(self.eos)
        if self.max_words and len(words) == self.max_words - 1:   # the word chosen now is the last
            ban += self.banned_endings
        n = self.no_repeat_ngram_size
        if n and len(words) >= n - 1:
            prefix = tuple(words[len(words) - n + 1:]) if n > 1 else ()
            ban += [words[i + n - 1] for i in range(len(words) - n + 1)
                    if tuple(words[i:i + n - 1]) == prefix]
        return ban


@dataclass
class Sampling:
    """Choosing the next word by sampling: softmax(logits / temperature) over the top_k words
    (0: all) and the smallest set of them whose probability reaches top_p, drawn with `generator`:
    a numpy Generator (Captioner's: the same draws on either engine), a torch.Generator (SCST's, on
    the model's device), or None (torch's global one for tensors, a fresh numpy one for arrays)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: Any = None

    def choose(self, logits: Array) -> Array:
        ops = array_ops(logits)
        logits = ops.cast(logits, "float32") / self.temperature           # (N, V)
        if self.top_k:
            kth = ops.topk(logits, min(self.top_k, logits.shape[-1]))[0][:, -1:]
            logits = ops.where(logits < kth, float("-inf"), logits)
        if self.top_p < 1.0:
            ordered, order = ops.sort_descending(logits)
            probs = ops.softmax(ordered)
            before = probs.cumsum(-1) - probs          # probability of the words ranked above
            logits = ops.scatter(logits, order,
                                 ops.where(before >= self.top_p, float("-inf"), ordered))
        return ops.multinomial(ops.softmax(logits), self.generator)


@dataclass
class AttentionSpec:
    """Each word's cross-attention map: the mean over heads and layers, or one layer / head."""
    layer: int | None = None
    head: int | None = None

    def reduce(self, weights: list[Array]) -> Array:
        """Per layer (N, H, L) -> (N, L), a map that sums to 1 over the grid."""
        ops = array_ops(weights[0])
        # w: (layers, N, H, L)
        w = ops.stack(weights) if self.layer is None else weights[self.layer][None]
        w = w.mean(2) if self.head is None else w[:, :, self.head]
        return ops.cast(w, "float32").mean(0)



# -----------------------------------------------------------------------------
# one entry point: the options a user sets, the search they choose

@dataclass
class DecodeOptions:
    """How captions are made: the keyword arguments of Captioner.caption, the flags of `caption`."""
    beam_size: int = 1                  # 1: greedy
    num_captions: int = 1               # the n best of beam search (or n samples), best first
    max_words: int | None = None        # None: the checkpoint's data.max_words
    length_penalty: float = 1.0         # beam: score = sum of log-probs / len ** length_penalty
    temperature: float | None = None    # any of temperature, top_k, top_p: sample, not search
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None             # sampling: the same seed gives the same captions
    no_repeat_ngram_size: int = 0       # a caption never repeats an n-gram of this size
    min_words: int = 0                  # no <eos> before this many words
    allow_function_word_end: bool = False   # else no caption ends on "a", "the" (FUNCTION_WORDS)
    attention: bool = False             # keep a cross-attention map per word
    attention_layer: int | None = None  # None: the mean over layers
    attention_head: int | None = None   # None: the mean over heads

    @property
    def sampling(self) -> bool:
        return self.temperature is not None or self.top_k > 0 or self.top_p < 1.0

    def check(self, num_layers: int, num_heads: int) -> DecodeOptions:
        """Raise ValueError naming the first bad option."""
        bad = [(self.beam_size < 1, "beam_size", "must be >= 1"),
               (self.num_captions < 1, "num_captions", ">= 1"),
               (self.max_words is not None and self.max_words < 1, "max_words", ">= 1"),
               (self.temperature is not None and not self.temperature > 0, "temperature",
                "must be > 0"),
               (self.top_k < 0, "top_k", ">= 0 (0: all words)"),
               (not 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
               (self.sampling and self.beam_size > 1, "beam_size", "must be 1 when sampling"),
               (self.no_repeat_ngram_size < 0, "no_repeat_ngram_size", ">= 0"),
               (self.min_words < 0, "min_words", ">= 0"),
               (self.attention_layer is not None and not 0 <= self.attention_layer < num_layers,
                "attention_layer", f"in 0..{num_layers - 1}"),
               (self.attention_head is not None and not 0 <= self.attention_head < num_heads,
                "attention_head", f"in 0..{num_heads - 1}")]
        for wrong, name, why in bad:
            if wrong:
                raise ValueError(f"{name}={getattr(self, name)!r}: {why}")
        return self


def rules_for(options: DecodeOptions, pad: int, bos: int, eos: int,
              word_ids: dict[str, int]) -> Rules:
    """The Rules of `options` for a vocabulary (word -> id)."""
    endings = frozenset() if options.allow_function_word_end else \
        frozenset(word_ids[w] for w in FUNCTION_WORDS if w in word_ids)
    # at least one word: a caption is never empty, whatever the model's first choice
    return Rules(pad, bos, eos, max(options.min_words, 1), options.no_repeat_ngram_size, endings,
                 options.max_words or 0)


