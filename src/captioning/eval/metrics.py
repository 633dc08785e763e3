"""Corpus caption metrics as coco-caption computes them: the numbers captioning papers report.

The scorers are pycocoevalcap's (coco-caption's pip package): BLEU-1..4 (corpus BLEU, "closest"
reference length), METEOR 1.5 (a Java subprocess), ROUGE-L (beta 1.2, mean over images) and CIDEr,
which there is CIDEr-D (tf-idf 1..4-grams, clipped, Gaussian length penalty sigma=6, times 10: 0..~3
on real data, exactly 10 for a perfect single-reference match). Captions are first PTB-tokenised
and stripped of punctuation by coco-caption's PTBTokenizer (Stanford CoreNLP 3.4.1, also Java).

Without Java (or with java=False) tokenisation falls back to `_tokenize_python`, a regex imitation
that matches the Java tokenizer on ordinary caption text, and METEOR is None. Brackets stay as
"-lrb-" etc. (coco-caption lowercases before matching its upper-case punctuation list). Known
differences: emoticons, a quote inside a token ("5'10", "rock'n'roll"), clitics Stanford's quote
heuristics misread, URLs and e-mails, and rarer abbreviations of Stanford's lists ("Sgt.", "Corp.").

Quirks kept from coco-caption so the numbers match: an empty prediction adds nothing to corpus BLEU
and scores 0 elsewhere, except ROUGE-L against a reference empty after tokenisation ("".split(" ")
is [""], so the image scores 1.0); CIDEr's idf is log(#images / df), so one image alone scores 0.
Departures where coco-caption would fail: CIDEr is 0 when no reference has a word left, and line
breaks inside a caption become spaces (its tokenizer reads one caption per line).
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import threading
from contextlib import suppress

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """Whether `java -version` runs (checked once per process)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _use_java(java: bool | None) -> bool:
    if java is None:
        return java_available()
    if java and not java_available():
        raise RuntimeError("java=True but `java -version` does not run; "
                           "install Java or pass java=None/False")
    return bool(java)


_UNICODE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                          "\u2026": " ... ", "\u2013": " -- ", "\u2014": " -- "})
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "ave.", "jr.", "sr.", "vs.",
                  "etc.", "inc.", "co.", "ltd.", "jan.", "feb.", "mar.", "apr.", "jun.", "jul.",
                  "aug.", "sep.", "sept.", "oct.", "nov.", "dec."}
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Applied in order to lowercased text: each either splits a token or blanks out punctuation that
# coco-caption would drop after tokenising anyway.
_RULES = [
    (re.compile(r'"|``|\'\'|`'), " "),                              # double quotes, backticks
    (re.compile(r"[()\[\]{}&$%#*=+~]"), r" \g<0> "),
    (re.compile(r"\.{2,}"), " "),                                    # ellipsis
    (re.compile(r"-{2,}"), " "),                                     # dash
    (re.compile(r",(?!\d)|(?<!\d),|;|(?<!\d):(?!\d|//)"), " "),       # not 1,000 3:30 http://
    (re.compile(r"[!?]+"), r" \g<0> "),                              # "!" goes, "?!" stays
    (re.compile(r"(?<=[a-z])n't\b"), " n't "),
    (re.compile(r"(?<=[a-z0-9])'(s|re|ve|ll|d|m)\b"), r" '\1 "),
    (re.compile(r"(?<!\S)'(?!(?:s|re|ve|ll|d|m|em|n'?|cause|till?|tis|twas|[2-9]0s)(?:\s|$))"),
     " "),
    (re.compile(r"(?<!\s'n)'(?=\.?(?:\s|$))"), " "),                 # closing quote (not rock 'n')
    (re.compile(r"(?<!\S)-(?=[a-z])|(?<=[a-z0-9])-(?!\S)"), " "),    # hyphen at a word's edge
]


def _tokenize_python(caption: str) -> str:
    text = " ".join(caption.lower().translate(_UNICODE).split())
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    words = text.split()
    tokens = []
    for i, word in enumerate(words):
        if word.endswith(".") and len(word) > 1 and word not in _ABBREVIATIONS \
                and not re.fullmatch(r"(?:[a-z]\.)+", word) \
                and not (word == "no." and i + 1 < len(words) and words[i + 1][0].isdigit()):
            word = word[:-1]
        tokens.extend(_SPLIT_WORDS.get(word, _BRACKETS.get(word, word)).split())
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def tokenize(captions: dict[str, list[str]], java: bool | None = None) -> dict[str, list[str]]:
    """PTB tokenisation as coco-caption does it (its PTBTokenizer, via Java) when java is True
    (None = when available); otherwise a pure-Python approximation: lowercase, PTB-style splits
    ("don't" -> "do n't", "dog's" -> "dog 's"), and the punctuation coco-caption drops removed."""
    if not _use_java(java):
        return {image: [_tokenize_python(c) for c in caps] for image, caps in captions.items()}
    if not any(captions.values()):
        return {image: [] for image in captions}
    # PTBTokenizer maps captions to lines of one file, so any line break inside a caption
    # (it only replaces "\n") would shift every caption after it onto the wrong image.
    out = PTBTokenizer().tokenize({image: [{"caption": " ".join(c.splitlines())} for c in caps]
                                   for image, caps in captions.items()})
    result = {image: out.get(image, []) for image in captions}
    if any(len(result[image]) != len(caps) for image, caps in captions.items()):
        raise RuntimeError("the Java PTBTokenizer returned a different number of captions "
                           "than it was given")
    return result


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        # Meteor only stops its JVM in __del__, which blocks forever on a lock that compute_score
        # leaves held if it raised; stop the JVM here and hand __del__ a free lock.
        proc = scorer.meteor_p
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with suppress(OSError):
                stream.close()
        scorer.lock = threading.Lock()


def score_captions(predictions: dict[str, str], references: dict[str, list[str]],
                   metrics: tuple[str, ...] = METRICS,
                   java: bool | None = None) -> tuple[dict[str, float | None], list[str]]:
    """Corpus scores of predictions (one caption per image) against references (several per image).

    Every metric is computed over the whole set at once (CIDEr's document frequencies come from
    the references being scored, never per batch). Returns ({metric: value}, notes): all requested
    metric keys are present; METEOR is None when Java is unavailable (it needs Java), and `notes`
    says so, and says when the pure-Python tokenisation was used. Scores are on coco-caption's
    0..1 scale (CIDEr usually 0..~3).

    The images scored are those in `predictions`; references of other images are not used.
    java: True = require Java (RuntimeError without it), False = never use it, None = use it if
    present.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        problem = f"unknown metric(s) {unknown}" if unknown else "no metric requested"
        raise ValueError(f"{problem}; known metrics: {', '.join(METRICS)}")
    if not predictions:
        raise ValueError("predictions is empty: there is nothing to score")
    for image, caption in predictions.items():
        if image not in references:
            raise ValueError(f"image {image!r} has a prediction but no entry in references")
        refs = references[image]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"image {image!r} has no references "
                             f"(need a non-empty list of strings, got {refs!r})")
        if not isinstance(caption, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"image {image!r}: the prediction must be a str "
                            "and its references a list of str")

    use_java = _use_java(java)
    notes = []
    if not use_java:
        why = "java=False" if java is False else "Java is not available"
        notes.append(f"{why}: captions were tokenised by the pure-Python approximation of "
                     "coco-caption's PTB tokenizer, so scores may differ slightly from "
                     "coco-caption's")
        if "METEOR" in metrics:
            notes.append(f"METEOR is None: it runs on Java ({why})")
    gts = tokenize({image: list(references[image]) for image in predictions}, java=use_java)
    res = tokenize({image: [caption] for image, caption in predictions.items()}, java=use_java)

    scores: dict[str, float | None] = {}
    if any(m.startswith("BLEU") for m in metrics):
        bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
        scores.update({f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)})
    if "METEOR" in metrics:
        scores["METEOR"] = _meteor(gts, res) if use_java else None
    if "ROUGE-L" in metrics:
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        # pycocoevalcap's Cider takes max() of an empty df table when no reference has a token
        has_words = any(ref for refs in gts.values() for ref in refs)
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0]) if has_words else 0.0
    return {m: scores[m] for m in metrics}, notes
