"""How varied the captions are, beside how right they are (the coco-caption metrics in metrics.py).

    distinct_n      distinct n-grams / all n-grams over every prediction (Li et al. 2016)
    vocabulary      how many distinct words the predictions use
    copied_share    the share of predictions that appear word for word among the training captions
    mbleu4          with several captions an image: BLEU-4 of each against the image's others,
                    averaged (Shetty et al. 2017; lower = more diverse)
    mean_words      words per caption
    function_word_end   the share of captions that end on "a", "the", "of", ... (cut short)
"""
from __future__ import annotations

from pycocoevalcap.bleu.bleu import Bleu

from ..data.vocab import tokenize
from ..decode.rules import FUNCTION_WORDS


def _ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(captions: list[str], n: int) -> float:
    grams = [g for c in captions for g in _ngrams(tokenize(c), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def vocabulary(captions: list[str]) -> int:
    return len({w for c in captions for w in tokenize(c)})


def copied_share(captions: list[str], training: list[str]) -> float:
    seen = {" ".join(tokenize(c)) for c in training}
    return (sum(" ".join(tokenize(c)) in seen for c in captions) / len(captions)
            if captions else 0.0)


def mbleu4(captions_per_image: list[list[str]]) -> float | None:
    """Mean BLEU-4 of each caption against its image's other captions (None: fewer than 2 each)."""
    gts, res = {}, {}
    for i, captions in enumerate(captions_per_image):
        if len(captions) < 2:
            continue
        for k, caption in enumerate(captions):
            gts[f"{i}/{k}"] = [" ".join(tokenize(c)) for j, c in enumerate(captions) if j != k]
            res[f"{i}/{k}"] = [" ".join(tokenize(caption))]
    if not res:
        return None
    _, per_caption = Bleu(4).compute_score(gts, res, verbose=0)
    return sum(per_caption[3]) / len(per_caption[3])


def mean_words(captions: list[str]) -> float:
    return sum(len(tokenize(c)) for c in captions) / len(captions) if captions else 0.0


def function_word_end(captions: list[str]) -> float:
    """The share of captions whose last word is a function word ("a", "the", "of", ...:
    decoding.FUNCTION_WORDS), the mark of captions that learned to stop short (SCST without <eos> in
    its reward)."""
    ends = [tokenize(c)[-1:] for c in captions]
    return (sum(bool(e) and e[0] in FUNCTION_WORDS for e in ends) / len(captions)
            if captions else 0.0)


def diversity(captions: list[str], training: list[str],
              captions_per_image: list[list[str]] | None = None) -> dict:
    """The diversity figures `evaluate` reports beside the coco-caption metrics."""
    out = {"distinct_1": distinct_n(captions, 1), "distinct_2": distinct_n(captions, 2),
           "vocabulary": vocabulary(captions), "copied_share": copied_share(captions, training),
           "mean_words": mean_words(captions), "function_word_end": function_word_end(captions)}
    if captions_per_image and max(map(len, captions_per_image)) > 1:
        out["mBLEU-4"] = mbleu4(captions_per_image)
    return out
