"""The search: transformer memory -> word ids, greedy, by beam search or sampled, through an Engine.

The searches never touch a model: they ask an engine (`Engine`) for two things,

    engine.init_cache(memory, group)   each image's cross-attention keys/values, once per image
    engine.step(cache, tokens)         one new word per sequence -> next-word logits (N, V);
                                       its self-attention keys/values are appended to the cache

so a step costs one position per sequence, whatever the length so far. `torch_engine.TorchEngine` is
the PyTorch model; `onnx_engine.OrtEngine` runs the exported graphs of the same two functions.
Wherever a search takes `model`, either a CaptionModel or an engine may be passed.

This module does not import torch. The search works on its engine's kind of arrays, torch tensors
(on any device) or numpy arrays, as memory is one or the other, through the few operations of
`ArrayOps`: `torch_engine.TorchOps`, or `NumpyOps` here. So a process that captions from an export
never loads PyTorch (about 500 MB of its RSS, docs/design.md), and the search is still written once.

Both searches never emit <pad> or <bos>: neither is ever a word, and the
training path masks <pad> keys where the cache does not.
"""
from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from .model import CaptionModel

    Array = torch.Tensor | np.ndarray

# -----------------------------------------------------------------------------
# the cache and the engine the searches call

@dataclass
class DecoderCache:
    """Keys and values of every decoder layer for N sequences decoded side by side (tensors or arrays).

    The N rows are grouped `group` at a time per image (beam search: the K
    beams of one image), and rows of one group share their image's
    cross-attention keys/values rather than holding G copies of them.
    """
    self_k: list[Array]    # per layer (N, H, T, hd): one entry per word fed so far
    self_v: list[Array]
    cross_k: list[Array]   # per layer (M, H, L, hd): from memory, computed once; N = M * group
    cross_v: list[Array]

    @property
    def length(self) -> int:
        """Words fed so far, which is also the position of the next one."""
        return self.self_k[0].shape[2]

    @property
    def group(self) -> int:
        return self.self_k[0].shape[0] // self.cross_k[0].shape[0]

    def select(self, rows: Array, images: Array | None = None) -> DecoderCache:
        """Keep sequences `rows` (N',) and images `images` (M',), in that order.

        Reordering beams within their images leaves the images as they are
        (images=None); dropping finished sequences or images passes both.
        """
        def pick(ts: list[Array], index: Array) -> list[Array]:
            return [t[index] for t in ts]

        cross_k, cross_v = (self.cross_k, self.cross_v) if images is None else \
            (pick(self.cross_k, images), pick(self.cross_v, images))
        cache = DecoderCache(pick(self.self_k, rows), pick(self.self_v, rows), cross_k, cross_v)
        assert cache.self_k[0].shape[0] % cache.cross_k[0].shape[0] == 0, "rows must be whole groups per image"
        return cache


class Engine(Protocol):
    """What the search code needs of a model: a cache for memory's images, and one step of every row."""
    pad_id: int

    def init_cache(self, memory: Array, group: int = 1) -> DecoderCache: ...

    def step(self, cache: DecoderCache, tokens: Array, attention: list | None = None) -> Array: ...


def engine_of(model: CaptionModel | Engine) -> Engine:
    """A CaptionModel (a torch module: torch is imported if one exists) wrapped as an Engine
    (torch_engine.TorchEngine); an engine as it is."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return model
    from .torch_engine import TorchEngine

    return TorchEngine(model)


MOVED_TO_TORCH_ENGINE = ("init_cache", "step", "decoder_step", "decoder_hidden", "greedy_reference", "TorchEngine")


def __getattr__(name: str):
    """The PyTorch engine's functions, which lived here before the search stopped importing torch."""
    if name in MOVED_TO_TORCH_ENGINE:
        from . import torch_engine

        warnings.warn(f"captioning.decoding.{name} is now captioning.torch_engine.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(torch_engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -----------------------------------------------------------------------------
# the array operations the search needs, on numpy arrays (torch_engine.TorchOps: on tensors)

class ArrayOps(Protocol):
    """What the search does to its engine's arrays beyond what tensors and numpy arrays share (indexing,
    arithmetic, argmax, cumsum, tolist, ...).

    A dtype is named: "int64", "float32" or "float64". Every operation on rows works along the last axis.
    """

    def asarray(self, values, dtype: str) -> Array: ...

    def cast(self, x: Array, dtype: str) -> Array: ...          # always a new array: the search writes into it

    def log_softmax(self, x: Array) -> Array: ...

    def softmax(self, x: Array) -> Array: ...

    def topk(self, x: Array, k: int) -> tuple[Array, Array]: ...          # values and indices, largest first

    def sort_descending(self, x: Array) -> tuple[Array, Array]: ...

    def scatter(self, x: Array, index: Array, values: Array) -> Array: ...  # a copy of x, values put at index

    def where(self, mask: Array, value: float, x: Array) -> Array: ...     # value where mask, else x

    def stack(self, xs: list[Array]) -> Array: ...

    def concat(self, xs: list[Array]) -> Array: ...                        # along the first axis

    def repeat_rows(self, x: Array, n: int) -> Array: ...                  # each row n times, side by side

    def pick(self, x: Array, index: Array) -> Array: ...                   # x[i, index[i]] of each row i

    def multinomial(self, probs: Array, generator) -> Array: ...          # one word per row, drawn ~ probs


class NumpyOps:
    """ArrayOps on numpy arrays: the ONNX Runtime engine's."""

    @staticmethod
    def asarray(values, dtype: str) -> np.ndarray:
        return np.asarray(values, dtype=dtype)

    @staticmethod
    def cast(x: np.ndarray, dtype: str) -> np.ndarray:
        return x.astype(dtype)

    @staticmethod
    def log_softmax(x: np.ndarray) -> np.ndarray:
        shifted = x - x.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    @staticmethod
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    @staticmethod
    def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.argpartition(-x, k - 1, axis=-1)[..., :k]
        index = np.take_along_axis(index, np.argsort(-np.take_along_axis(x, index, -1), -1, kind="stable"), -1)
        return np.take_along_axis(x, index, -1), index

    @staticmethod
    def sort_descending(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.argsort(-x, -1, kind="stable")
        return np.take_along_axis(x, index, -1), index

    @staticmethod
    def scatter(x: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = x.copy()
        np.put_along_axis(out, index, values, -1)
        return out

    @staticmethod
    def where(mask: np.ndarray, value: float, x: np.ndarray) -> np.ndarray:
        return np.where(mask, np.asarray(value, dtype=x.dtype), x)

    @staticmethod
    def stack(xs: list[np.ndarray]) -> np.ndarray:
        return np.stack(xs)

    @staticmethod
    def concat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs)

    @staticmethod
    def repeat_rows(x: np.ndarray, n: int) -> np.ndarray:
        return np.repeat(x, n, axis=0)

    @staticmethod
    def pick(x: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, index[:, None], -1)[:, 0]

    def multinomial(self, probs: np.ndarray, generator: np.random.Generator | None) -> np.ndarray:
        if generator is not None and not isinstance(generator, np.random.Generator):
            raise TypeError(f"sampling on numpy arrays (an export) takes a numpy Generator, not {type(generator)}: "
                            "np.random.default_rng(seed)")
        return inverse_cdf(self, probs, generator if generator is not None else np.random.default_rng())


def array_ops(x: Array) -> ArrayOps:
    """The ArrayOps of x's kind: NumpyOps for a numpy array, TorchOps on x's device for a tensor."""
    if isinstance(x, np.ndarray):
        return NumpyOps()
    from .torch_engine import TorchOps  # x is a tensor, so torch is imported already

    return TorchOps(x.device)


def inverse_cdf(ops: ArrayOps, probs: Array, generator: np.random.Generator) -> Array:
    """One word per row of probs (N, V), drawn by inverse transform with the uniforms of a numpy `generator`:
    the same draw on either engine (and on any device: N numbers go to it). In float64, so u * total < total
    and a word of probability 0 is never drawn; a row that sums to 0 or to nan (a temperature so low that
    softmax overflows) is a ValueError, as in torch.multinomial."""
    cumulative = ops.cast(probs, "float64").cumsum(-1)
    total = cumulative[:, -1]
    if not bool(((total > 0) & (total < float("inf"))).all()):
        raise ValueError("sampling: a row's probabilities sum to 0, inf or nan (is the temperature too low?)")
    u = ops.asarray(generator.random(len(probs)), "float64") * total
    return (cumulative <= u[:, None]).sum(-1).clip(max=probs.shape[-1] - 1)


# -----------------------------------------------------------------------------
# what a caption may say, how the next word is chosen, which attention is kept

FUNCTION_WORDS = ("a", "an", "the", "of", "on", "in", "with", "and")


@dataclass
class Rules:
    """The logits processors every search applies before choosing a word.

    Never <pad> or <bos> (neither is ever a word); no <eos> before `min_words` words, nor right
    after a word of `banned_endings` (function words: a caption never stops on "a"); with
    `no_repeat_ngram_size` n, no word that would repeat an n-gram already in the caption.
    """
    pad: int
    bos: int
    eos: int
    min_words: int = 0
    no_repeat_ngram_size: int = 0
    banned_endings: frozenset[int] = frozenset()

    def apply(self, logits: Array, words: list[list[int]]) -> Array:
        """logits (N, V) of the next word after each row's `words` -> a float32 copy, banned words at -inf."""
        logits = array_ops(logits).cast(logits, "float32")
        logits[:, [self.pad, self.bos]] = float("-inf")
        rows, banned = [], []
        for i, ws in enumerate(words):
            ban = self._banned(ws)
            rows += [i] * len(ban)
            banned += ban
        if rows:
            logits[rows, banned] = float("-inf")
            stuck = (logits == float("-inf")).all(-1)                  # everything banned (a tiny vocabulary)
            if stuck.any():
                logits[stuck, self.eos] = 0.0
        return logits

    def _banned(self, words: list[int]) -> list[int]:
        ban = []
        if len(words) < self.min_words or (words and words[-1] in self.banned_endings):
            ban.append(self.eos)
        n = self.no_repeat_ngram_size
        if n and len(words) >= n - 1:
            prefix = tuple(words[len(words) - n + 1:]) if n > 1 else ()
            ban += [words[i + n - 1] for i in range(len(words) - n + 1) if tuple(words[i:i + n - 1]) == prefix]
        return ban


@dataclass
class Sampling:
    """Choosing the next word by sampling: softmax(logits / temperature) over the top_k words (0: all)
    and the smallest set of them whose probability reaches top_p, drawn with `generator`: a numpy
    Generator (Captioner's: the same draws on either engine), a torch.Generator (SCST's, on the
    model's device), or None (torch's global generator for tensors, a fresh numpy one for arrays)."""
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
            before = probs.cumsum(-1) - probs                          # probability of the words ranked above
            logits = ops.scatter(logits, order, ops.where(before >= self.top_p, float("-inf"), ordered))
        return ops.multinomial(ops.softmax(logits), self.generator)


@dataclass
class AttentionSpec:
    """Which cross-attention map each word keeps: the mean over heads and layers, or one layer / head."""
    layer: int | None = None
    head: int | None = None

    def reduce(self, weights: list[Array]) -> Array:
        """Per layer (N, H, L) -> (N, L), a map that sums to 1 over the grid."""
        ops = array_ops(weights[0])
        w = ops.stack(weights) if self.layer is None else weights[self.layer][None]   # (layers, N, H, L)
        w = w.mean(2) if self.head is None else w[:, :, self.head]
        return ops.cast(w, "float32").mean(0)


@dataclass
class Hypothesis:
    """One caption of one image: word ids (no <bos>/<eos>), the sum of their log-probabilities (with
    <eos> when it ended), the length-penalised score search ranked it by, and a map per word, <eos> too."""
    ids: list[int]
    logprob: float
    score: float
    maps: Array | None = None               # (words + 1, L) when it ended, (words, L) when cut at max_words
    ended: bool = True                      # it chose <eos> (else max_words cut it)


def _length_score(total: float, length: int, length_penalty: float) -> float:
    return total / max(length, 1) ** length_penalty


def _next_word(engine: Engine, ops: ArrayOps, cache: DecoderCache, tokens: Array, words: list[list[int]],
               rules: Rules, attention: AttentionSpec | None) -> tuple[Array, Array | None]:
    """One step of every row: log-probabilities (N, V) under the rules, and each row's map (N, L) if kept."""
    weights = None if attention is None else []
    logits = engine.step(cache, tokens, weights)
    maps = None if attention is None else attention.reduce(weights)
    return ops.log_softmax(rules.apply(logits, words)), maps


# -----------------------------------------------------------------------------
# greedy and sampling

def sample_or_greedy(model: CaptionModel | Engine, memory: Array, rules: Rules, max_words: int,
                     sampling: Sampling | None = None, attention: AttentionSpec | None = None,
                     length_penalty: float = 1.0) -> list[Hypothesis]:
    """One caption per image of memory (B, L, D): the likeliest word at each step, or a sampled one.

    Each sequence stops at its own <eos> and leaves the batch, so the others do not carry it along.
    """
    if len(memory) == 0:
        return []
    B, engine, ops = len(memory), engine_of(model), array_ops(memory)
    cache = engine.init_cache(memory)
    words, sums = [[] for _ in range(B)], [0.0] * B
    maps = [[] for _ in range(B)]
    alive = list(range(B))                                            # the image each row of the cache decodes
    tokens = ops.asarray([rules.bos] * B, "int64")
    ended = [False] * B
    for _ in range(max_words):
        logp, step_maps = _next_word(engine, ops, cache, tokens, [words[b] for b in alive], rules, attention)
        tokens = logp.argmax(-1) if sampling is None else sampling.choose(logp)     # (n,)
        picked = ops.pick(logp, tokens).tolist()
        for j, (b, word) in enumerate(zip(alive, tokens.tolist())):
            sums[b] += picked[j]
            if step_maps is not None:
                maps[b].append(step_maps[j])
            if word == rules.eos:
                ended[b] = True
            else:
                words[b].append(word)
        keep = [j for j, b in enumerate(alive) if not ended[b]]
        if not keep:
            break
        if len(keep) < len(alive):
            index = ops.asarray(keep, "int64")
            cache, tokens, alive = cache.select(index, index), tokens[index], [alive[j] for j in keep]
    return [Hypothesis(words[b], sums[b], _length_score(sums[b], len(words[b]) + ended[b], length_penalty),
                       ops.stack(maps[b]) if maps[b] else None, ended[b]) for b in range(B)]


def greedy(model: CaptionModel | Engine, memory: Array, bos: int, eos: int, max_words: int,
           rules: Rules | None = None) -> list[list[int]]:
    """Batched greedy decoding: B lists of word ids (without <bos>/<eos>), at most `max_words` each."""
    rules = rules or Rules(model.pad_id, bos, eos)
    return [h.ids for h in sample_or_greedy(model, memory, rules, max_words)]


# -----------------------------------------------------------------------------
# beam search

@dataclass
class _Beams:
    """The live beams of the images still searching: K per image, row j*K+k of the cache."""
    images: list[int]                      # which image each searching group is
    words: list[list[list[int]]]           # [group][beam] -> word ids so far
    maps: list[list[list[Array]]]          # [group][beam] -> a map per word so far (empty without attention)
    sums: Array                            # (groups, K) summed log-probabilities


def beam_search_hypotheses(model: CaptionModel | Engine, memory: Array, rules: Rules, max_words: int,
                           beam_size: int = 3, length_penalty: float = 1.0, n_best: int = 1,
                           attention: AttentionSpec | None = None) -> list[list[Hypothesis]]:
    """Batched beam search: B images x K beams flattened into one batch of B*K sequences.

    A hypothesis scores  sum of log-probs / len ** length_penalty,  len = words
    + <eos> (plain length normalisation: 1.0 = mean log-prob per token, 0.0 = the
    raw sum). Live beams are ranked by the raw sum, finished ones by the score.
    As in fairseq, an <eos> candidate finishes a hypothesis when it ranks in the
    top K of its image; as in Hugging Face's (early_stopping=False), an image
    stops once it holds K finished hypotheses and its K-th best scores at least
    what its best live beam would score if it ended now. beam_size=1 is then
    exactly greedy. Attention maps follow the beams' back-pointers.

    Returns per image its n_best hypotheses, best first; when fewer than n_best
    finished within `max_words` words, the best live beams (scored over their words) fill in.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={beam_size}")
    if len(memory) == 0:
        return []
    B, K, engine, ops = len(memory), beam_size, engine_of(model), array_ops(memory)
    cache = engine.init_cache(memory, group=K)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    sums = ops.asarray([float("-inf")] * (B * K), "float32").reshape(B, K)
    sums[:, 0] = 0.0           # every beam starts as <bos>; -inf on all but the first expands just one of them
    beams = _Beams(list(range(B)), [[[] for _ in range(K)] for _ in range(B)],
                   [[[] for _ in range(K)] for _ in range(B)], sums)
    tokens = ops.asarray([rules.bos] * (B * K), "int64")
    score = functools.partial(_length_score, length_penalty=length_penalty)
    for t in range(max_words):
        logp, maps = _next_word(engine, ops, cache, tokens, [w for ws in beams.words for w in ws], rules, attention)
        V = logp.shape[-1]
        candidates = (beams.sums[:, :, None] + logp.reshape(-1, K, V)).reshape(-1, K * V)  # (n, K*V)
        # a beam has one <eos>, so 2K candidates hold K that go on
        top_sums, top_idx = ops.topk(candidates, min(2 * K, K * V))                      # (n, 2K)
        chosen, still = [], []                  # (row, word, sum, words, maps) of the next beams; groups going on
        for j, (cand_sums, cand_idx) in enumerate(zip(top_sums.tolist(), top_idx.tolist())):
            b = beams.images[j]
            going = _expand_image(j, cand_sums, cand_idx, beams, maps, finished[b], K, V, rules.eos, score, ops)
            if _image_done(going, finished[b], K, score(going[0][2], t + 1) if going else float("-inf")):
                continue
            still.append(j)
            chosen += going + [going[0][:2] + (float("-inf"), [], [])] * (K - len(going))   # dead fillers
        if not still:
            break
        cache, tokens, beams = _advance(cache, beams, chosen, still, K, ops)
    else:
        _fill_in(beams, finished, n_best, score, ops)
    return [sorted(hyps, key=lambda h: -h.score)[:n_best] for hyps in finished]


def _expand_image(j: int, cand_sums: list[float], cand_idx: list[int], beams: _Beams, maps: Array | None,
                  finished: list[Hypothesis], K: int, V: int, eos: int, score, ops: ArrayOps) -> list[tuple]:
    """Group j's top candidates (best first) -> its up to K beams that go on, as (row, word, sum, words, maps).

    An <eos> candidate ranked in the top K finishes its hypothesis (appended to `finished`).
    """
    going = []
    for rank, (total, idx) in enumerate(zip(cand_sums, cand_idx)):
        if total == float("-inf") or len(going) == K:
            break
        k, word = divmod(idx, V)
        words, kept = beams.words[j][k], beams.maps[j][k] + ([] if maps is None else [maps[j * K + k]])
        if word != eos:
            going.append((j * K + k, word, total, words + [word], kept))
        elif rank < K:
            finished.append(Hypothesis(words, total, score(total, len(words) + 1),
                                       ops.stack(kept) if kept else None))
    return going


def _image_done(going: list, finished: list[Hypothesis], K: int, reach: float) -> bool:
    """No beam goes on, or K finished hypotheses of which the K-th best scores at least `reach`.

    `reach`: the best live sum scored at the length of this step's finished hypotheses: Hugging
    Face's heuristic bound (exact for length_penalty=0, as sums only fall; a longer length could
    still lift a score). It never beats a finished sibling ranked above it, so beam_size=1 is greedy.
    """
    best = sorted((h.score for h in finished), reverse=True)
    return not going or (len(best) >= K and best[K - 1] >= reach)


def _advance(cache: DecoderCache, beams: _Beams, chosen: list[tuple], still: list[int], K: int, ops: ArrayOps):
    """The cache, next tokens and beams of the groups still searching, in the order of `chosen`."""
    rows, next_tokens, next_sums, next_words, next_maps = zip(*chosen)
    ids = functools.partial(ops.asarray, dtype="int64")
    cache = cache.select(ids(rows), None if len(still) == len(beams.images) else ids(still))
    group = lambda xs: [list(xs[i:i + K]) for i in range(0, len(xs), K)]   # noqa: E731
    return cache, ids(next_tokens), _Beams([beams.images[j] for j in still], group(next_words),
                                           group(next_maps), ops.asarray(next_sums, "float32").reshape(-1, K))


def _fill_in(beams: _Beams, finished: list[list[Hypothesis]], n_best: int, score, ops: ArrayOps) -> None:
    """max_words words and still fewer than n_best finished: the live beams fill in."""
    for j, b in enumerate(beams.images):
        if len(finished[b]) < n_best:
            finished[b] += [Hypothesis(ws, total, score(total, len(ws)), ops.stack(ms) if ms else None, False)
                            for ws, ms, total in zip(beams.words[j], beams.maps[j], beams.sums[j].tolist())
                            if total > float("-inf")]


def beam_search(model: CaptionModel | Engine, memory: Array, bos: int, eos: int, max_words: int,
                beam_size: int = 3, length_penalty: float = 1.0, n_best: int = 1
                ) -> list[list[tuple[list[int], float]]]:
    """Per image its n_best (ids without <bos>/<eos>, score), best first (see beam_search_hypotheses)."""
    hyps = beam_search_hypotheses(model, memory, Rules(model.pad_id, bos, eos), max_words, beam_size,
                                  length_penalty, n_best)
    return [[(h.ids, h.score) for h in image] for image in hyps]


# -----------------------------------------------------------------------------
# one entry point: the options a user sets, the search they choose

@dataclass
class DecodeOptions:
    """How captions are made: the keyword arguments of Captioner.caption, the flags of `caption`."""
    beam_size: int = 1                  # 1: greedy
    num_captions: int = 1               # the n best of beam search (or n samples), best first
    max_words: int | None = None        # None: the checkpoint's data.max_words
    length_penalty: float = 1.0         # beam search: score = sum of log-probs / len ** length_penalty
    temperature: float | None = None    # any of temperature, top_k, top_p: sample instead of searching
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None             # sampling: the same seed gives the same captions
    no_repeat_ngram_size: int = 0       # a caption never repeats an n-gram of this size
    min_words: int = 0                  # no <eos> before this many words
    allow_function_word_end: bool = False   # else no caption ends on "a", "the", "of", ... (FUNCTION_WORDS)
    attention: bool = False             # keep a cross-attention map per word
    attention_layer: int | None = None  # None: the mean over layers
    attention_head: int | None = None   # None: the mean over heads

    @property
    def sampling(self) -> bool:
        return self.temperature is not None or self.top_k > 0 or self.top_p < 1.0

    def check(self, num_layers: int, num_heads: int) -> DecodeOptions:
        """Raise ValueError naming the first bad option."""
        bad = [(self.beam_size < 1, "beam_size", "must be >= 1"), (self.num_captions < 1, "num_captions", ">= 1"),
               (self.max_words is not None and self.max_words < 1, "max_words", ">= 1"),
               (self.temperature is not None and not self.temperature > 0, "temperature", "must be > 0"),
               (self.top_k < 0, "top_k", ">= 0 (0: all words)"), (not 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
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


def rules_for(options: DecodeOptions, pad: int, bos: int, eos: int, word_ids: dict[str, int]) -> Rules:
    """The Rules of `options` for a vocabulary (word -> id)."""
    endings = frozenset() if options.allow_function_word_end else \
        frozenset(word_ids[w] for w in FUNCTION_WORDS if w in word_ids)
    return Rules(pad, bos, eos, options.min_words, options.no_repeat_ngram_size, endings)


def search(model: CaptionModel | Engine, memory: Array, options: DecodeOptions, rules: Rules,
           generator=None) -> list[list[Hypothesis]]:
    """Per image of memory (B, L, D) its `num_captions` hypotheses, best first: sampled (with `generator`,
    see Sampling), by beam search, or greedy."""
    spec = AttentionSpec(options.attention_layer, options.attention_head) if options.attention else None
    n = options.num_captions
    if options.sampling:
        sampling = Sampling(options.temperature or 1.0, options.top_k, options.top_p, generator)
        hyps = sample_or_greedy(model, array_ops(memory).repeat_rows(memory, n), rules, options.max_words, sampling,
                                spec, options.length_penalty)
        return [sorted(hyps[i:i + n], key=lambda h: -h.score) for i in range(0, len(hyps), n)]
    if options.beam_size == 1 and n == 1:
        return [[h] for h in sample_or_greedy(model, memory, rules, options.max_words, None, spec,
                                               options.length_penalty)]
    return beam_search_hypotheses(model, memory, rules, options.max_words, max(options.beam_size, n),
                                  options.length_penalty, n, spec)
