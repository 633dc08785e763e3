"""CIDEr-D from token ids, in-process: the reward of self-critical training.

The same numbers as coco-caption's CIDEr-D (pycocoevalcap's `Cider`, which is CIDEr-D: n-grams
1..4, tf-idf vectors, the hypothesis's counts clipped at the reference's, a Gaussian length penalty
with sigma 6, times 10), computed from word ids instead of tokenized strings, with the references'
vectors computed once per image:

    cider = CiderD.build(training_references)          # document frequencies of the training split
    cider.scores(sampled_ids, image_keys)               # one reward per sampled caption

Two quirks of the reference implementation are kept, so the numbers match it: the "length" in the
penalty counts bigrams, not words; and the idf's corpus size is the number of images whose
references built the document frequencies. The frequencies belong to one vocabulary: `save` stores
them with the vocabulary's fingerprint, and `load` refuses another vocabulary's.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..files import write_atomic

N, SIGMA = 4, 6.0
Ngram = tuple[int, ...]


def ngram_counts(ids: list[int], n: int = N) -> Counter:
    return Counter(tuple(ids[i:i + k]) for k in range(1, n + 1) for i in range(len(ids) - k + 1))


class CiderD:
    def __init__(self, document_frequency: dict[Ngram, float], images: int,
                 references: dict | None = None):
        self.df, self.images = document_frequency, images
        self.log_images = math.log(float(images))
        self.references = references or {}      # image key -> its references' token ids
        self._ref_vectors: dict = {}

    @classmethod
    def build(cls, references: dict[str, list[list[int]]]) -> CiderD:
        """Document frequencies from `references` (image key -> the token ids of its captions,
        without <bos>/<eos>): in how many images' references each n-gram occurs."""
        df = defaultdict(float)
        for refs in references.values():
            for gram in {g for ref in refs for g in ngram_counts(ref)}:
                df[gram] += 1
        return cls(dict(df), len(references), references)

    # ---------------------------------------------------------------- scoring

    def _vector(self, counts: Counter) -> tuple[list[dict], np.ndarray, int]:
        vec, norm, length = [{} for _ in range(N)], np.zeros(N), 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (self.log_images - math.log(max(1.0, self.df.get(gram, 0.0))))
            norm[k] += vec[k][gram] ** 2
            if k == 1:                           # coco-caption's "length": the number of bigrams
                length += tf
        return vec, np.sqrt(norm), length

    def _similarity(self, hyp, ref) -> float:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        val = np.zeros(N)
        for k in range(N):
            val[k] = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
        return float((val * math.exp(-((lh - lr) ** 2) / (2 * SIGMA ** 2))).mean())

    def score(self, candidate: list[int], references: list[list[int]]) -> float:
        """CIDEr-D of one caption against its references (token ids without <bos>/<eos>)."""
        hyp = self._vector(ngram_counts(candidate))
        refs = [self._vector(ngram_counts(r)) for r in references]
        return 10.0 * sum(self._similarity(hyp, ref) for ref in refs) / len(refs)

    def scores(self, candidates: list[list[int]], keys: list[str]) -> np.ndarray:
        """CIDEr-D of each candidate against its image's references (`keys`, as given to `build`);
        each image's reference vectors are computed once and kept."""
        out = np.zeros(len(candidates))
        for i, (candidate, key) in enumerate(zip(candidates, keys)):
            if key not in self._ref_vectors:
                self._ref_vectors[key] = [self._vector(ngram_counts(r))
                                          for r in self.references[key]]
            refs = self._ref_vectors[key]
            hyp = self._vector(ngram_counts(candidate))
            out[i] = 10.0 * sum(self._similarity(hyp, ref) for ref in refs) / len(refs)
        return out

    # ---------------------------------------------------------------- storage

    def save(self, path: str | Path, vocab_fingerprint: str) -> None:
        data = {"vocab_sha256": vocab_fingerprint, "images": self.images, "n": N,
                "document_frequency": [[list(g), c] for g, c in self.df.items()]}
        write_atomic(path, lambda f: json.dump(data, f), "w")

    @classmethod
    def load(cls, path: str | Path, vocab_fingerprint: str,
             references: dict | None = None) -> CiderD:
        data = json.loads(Path(path).read_text())
        if data.get("vocab_sha256") != vocab_fingerprint:
            raise ValueError(f"{path}: CIDEr-D document frequencies of another vocabulary (sha256 "
                             f"{str(data.get('vocab_sha256'))[:12]}..., "
                             f"this one {vocab_fingerprint[:12]}...): delete "
                             "the file to build them again from this run's training captions")
        df = {tuple(g): float(c) for g, c in data["document_frequency"]}
        return cls(df, int(data["images"]), references)
