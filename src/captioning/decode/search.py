"""The search: transformer memory -> word ids, greedy, by beam search or sampled, through an Engine.

The searches never touch a model: they ask an engine (`Engine`) for two things,

    engine.init_cache(memory, group)   each image's cross-attention keys/values, once per image
    engine.step(cache, tokens)         one new word per sequence -> next-word logits (N, V);
                                       its self-attention keys/values are appended to the cache

so a step costs one position per sequence, whatever the length so far. The PyTorch `CaptionModel`
is itself an engine; `onnx_engine.OrtEngine` runs the exported graphs of the same two calls. The
caller passes the engine: this module imports none.

The search works on its engine's kind of arrays (as memory is), torch tensors on any device or numpy
arrays, through `arrays.ArrayOps`; it imports no torch, so captioning from an export never loads
PyTorch (docs/design.md), and the search is still written once.

Both searches never emit <pad> or <bos>: neither is ever a word, and the
training path masks <pad> keys where the cache does not.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

from ..model.kv_cache import DecoderCache
from .arrays import Array, ArrayOps, array_ops
from .rules import AttentionSpec, DecodeOptions, Rules, Sampling


class Engine(Protocol):
    """What the search needs of a model: a cache for memory's images, and one step of every row."""
    pad_id: int

    def init_cache(self, memory: Array, group: int = 1) -> DecoderCache: ...

    def step(self, cache: DecoderCache, tokens: Array, attention: list | None = None) -> Array: ...




@dataclass
class Hypothesis:
    """One caption of one image: word ids (no <bos>/<eos>), the sum of their log-probabilities
    (with <eos> when it ended), the length-penalised score search ranked it by, and a map per word,
    <eos> too."""
    ids: list[int]
    logprob: float
    score: float
    maps: Array | None = None               # (words + 1, L) when it ended, (words, L) when cut
    ended: bool = True                      # it chose <eos> (else max_words cut it)


def _length_score(total: float, length: int, length_penalty: float) -> float:
    return total / max(length, 1) ** length_penalty


def _next_word(engine: Engine, ops: ArrayOps, cache: DecoderCache, tokens: Array,
               words: list[list[int]], rules: Rules,
               attention: AttentionSpec | None) -> tuple[Array, Array | None]:
    """One step of every row: log-probs (N, V) under the rules, each row's map (N, L) if kept."""
    weights = None if attention is None else []
    logits = engine.step(cache, tokens, weights)
    maps = None if attention is None else attention.reduce(weights)
    return ops.log_softmax(rules.apply(logits, words)), maps


# -----------------------------------------------------------------------------
# greedy and sampling

def sample_or_greedy(engine: Engine, memory: Array, rules: Rules, max_words: int,
                     sampling: Sampling | None = None, attention: AttentionSpec | None = None,
                     length_penalty: float = 1.0) -> list[Hypothesis]:
    """One caption per image of memory (B, L, D): the likeliest word at each step, or a sampled one.

    Each sequence stops at its own <eos> and leaves the batch, so the others do not carry it along.
    """
    if len(memory) == 0:
        return []
    B, engine, ops = len(memory), engine, array_ops(memory)
    cache = engine.init_cache(memory)
    words, sums = [[] for _ in range(B)], [0.0] * B
    maps = [[] for _ in range(B)]
    alive = list(range(B))                          # the image each row of the cache decodes
    tokens = ops.asarray([rules.bos] * B, "int64")
    ended = [False] * B
    for _ in range(max_words):
        logp, step_maps = _next_word(engine, ops, cache, tokens, [words[b] for b in alive], rules,
                                     attention)
        tokens = logp.argmax(-1) if sampling is None else sampling.choose(logp)    # (n,)
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
            cache, tokens, alive = (cache.select(index, index), tokens[index],
                                    [alive[j] for j in keep])
    return [Hypothesis(words[b], sums[b],
                       _length_score(sums[b], len(words[b]) + ended[b], length_penalty),
                       ops.stack(maps[b]) if maps[b] else None, ended[b]) for b in range(B)]


def greedy(engine: Engine, memory: Array, bos: int, eos: int, max_words: int,
           rules: Rules | None = None) -> list[list[int]]:
    """Batched greedy decoding: B lists of word ids (no <bos>/<eos>), at most `max_words` each."""
    rules = rules or Rules(engine.pad_id, bos, eos)
    return [h.ids for h in sample_or_greedy(engine, memory, rules, max_words)]


# -----------------------------------------------------------------------------
# beam search

@dataclass
class _Beams:
    """The live beams of the images still searching: K per image, row j*K+k of the cache."""
    images: list[int]                      # which image each searching group is
    words: list[list[list[int]]]           # [group][beam] -> word ids so far
    maps: list[list[list[Array]]]          # [group][beam] -> a map per word (or none: no attention)
    sums: Array                            # (groups, K) summed log-probabilities


def beam_search_hypotheses(engine: Engine, memory: Array, rules: Rules, max_words: int,
                           beam_size: int = 3, length_penalty: float = 1.0, n_best: int = 1,
                           attention: AttentionSpec | None = None) -> list[list[Hypothesis]]:
    """Batched beam search: B images x K beams flattened into one batch of B*K sequences.

    A hypothesis scores  sum of log-probs / len ** length_penalty,  len = words + <eos> (plain
    length normalisation: 1.0 = mean log-prob per token, 0.0 = the raw sum). Live beams are ranked
    by the raw sum, finished ones by the score. As in fairseq, an <eos> candidate finishes a
    hypothesis when it ranks in the top K of its image; as in Hugging Face's (early_stopping=False),
    an image stops once it holds K finished hypotheses and its K-th best scores at least what its
    best live beam would score if it ended now. beam_size=1 is then exactly greedy. Attention maps
    follow the beams' back-pointers.

    Returns per image its n_best hypotheses, best first; when fewer than n_best finished within
    `max_words` words, the best live beams (scored over their words) fill in.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, "
                         f"beam_size={beam_size}")
    if len(memory) == 0:
        return []
    B, K, engine, ops = len(memory), beam_size, engine, array_ops(memory)
    cache = engine.init_cache(memory, group=K)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    sums = ops.asarray([float("-inf")] * (B * K), "float32").reshape(B, K)
    sums[:, 0] = 0.0       # every beam starts as <bos>: -inf on all but the first expands just one
    beams = _Beams(list(range(B)), [[[] for _ in range(K)] for _ in range(B)],
                   [[[] for _ in range(K)] for _ in range(B)], sums)
    tokens = ops.asarray([rules.bos] * (B * K), "int64")
    score = functools.partial(_length_score, length_penalty=length_penalty)
    for t in range(max_words):
        logp, maps = _next_word(engine, ops, cache, tokens, [w for ws in beams.words for w in ws],
                                rules, attention)
        V = logp.shape[-1]
        candidates = (beams.sums[:, :, None] + logp.reshape(-1, K, V)).reshape(-1, K * V)  # n, K*V
        # a beam has one <eos>, so 2K candidates hold K that go on
        top_sums, top_idx = ops.topk(candidates, min(2 * K, K * V))                  # (n, 2K)
        # chosen: (row, word, sum, words, maps) of the next beams; still: the groups going on
        chosen, still = [], []
        for j, (cand_sums, cand_idx) in enumerate(zip(top_sums.tolist(), top_idx.tolist())):
            b = beams.images[j]
            going = _expand_image(j, cand_sums, cand_idx, beams, maps, finished[b], K, V, rules.eos,
                                  score, ops)
            if _image_done(going, finished[b], K,
                           score(going[0][2], t + 1) if going else float("-inf")):
                continue
            still.append(j)
            # dead fillers: K rows a group
            chosen += going + [going[0][:2] + (float("-inf"), [], [])] * (K - len(going))
        if not still:
            break
        cache, tokens, beams = _advance(cache, beams, chosen, still, K, ops)
    else:
        _fill_in(beams, finished, n_best, score, ops)
    return [sorted(hyps, key=lambda h: -h.score)[:n_best] for hyps in finished]


def _expand_image(j: int, cand_sums: list[float], cand_idx: list[int], beams: _Beams,
                  maps: Array | None, finished: list[Hypothesis], K: int, V: int, eos: int, score,
                  ops: ArrayOps) -> list[tuple]:
    """Group j's top candidates (best first) -> its up to K beams that go on, as
    (row, word, sum, words, maps).

    An <eos> candidate ranked in the top K finishes its hypothesis (appended to `finished`).
    """
    going = []
    for rank, (total, idx) in enumerate(zip(cand_sums, cand_idx)):
        if total == float("-inf") or len(going) == K:
            break
        k, word = divmod(idx, V)
        words, kept = (beams.words[j][k],
                       beams.maps[j][k] + ([] if maps is None else [maps[j * K + k]]))
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
    still lift a score). It never beats a finished sibling ranked above it: beam_size=1 is greedy.
    """
    best = sorted((h.score for h in finished), reverse=True)
    return not going or (len(best) >= K and best[K - 1] >= reach)


def _advance(cache: DecoderCache, beams: _Beams, chosen: list[tuple], still: list[int], K: int,
             ops: ArrayOps):
    """The cache, next tokens and beams of the groups still searching, in the order of `chosen`."""
    rows, next_tokens, next_sums, next_words, next_maps = zip(*chosen)
    ids = functools.partial(ops.asarray, dtype="int64")
    cache = cache.select(ids(rows), None if len(still) == len(beams.images) else ids(still))
    group = lambda xs: [list(xs[i:i + K]) for i in range(0, len(xs), K)]   # noqa: E731
    return cache, ids(next_tokens), _Beams([beams.images[j] for j in still], group(next_words),
                                           group(next_maps),
                                           ops.asarray(next_sums, "float32").reshape(-1, K))


def _fill_in(beams: _Beams, finished: list[list[Hypothesis]], n_best: int, score,
             ops: ArrayOps) -> None:
    """max_words words and still fewer than n_best finished: the live beams fill in."""
    for j, b in enumerate(beams.images):
        if len(finished[b]) < n_best:
            finished[b] += [Hypothesis(ws, total, score(total, len(ws)),
                                       ops.stack(ms) if ms else None, False)
                            for ws, ms, total in zip(beams.words[j], beams.maps[j],
                                                     beams.sums[j].tolist())
                            if total > float("-inf")]


def beam_search(engine: Engine, memory: Array, bos: int, eos: int, max_words: int,
                beam_size: int = 3, length_penalty: float = 1.0, n_best: int = 1
                ) -> list[list[tuple[list[int], float]]]:
    """Per image its n_best (ids without <bos>/<eos>, score), best first; see
    beam_search_hypotheses."""
    hyps = beam_search_hypotheses(engine, memory, Rules(engine.pad_id, bos, eos), max_words,
                                  beam_size, length_penalty, n_best)
    return [[(h.ids, h.score) for h in image] for image in hyps]



def search(engine: Engine, memory: Array, options: DecodeOptions, rules: Rules,
           generator=None) -> list[list[Hypothesis]]:
    """Per image of memory (B, L, D) its `num_captions` hypotheses, best first: sampled (with
    `generator`, see Sampling), by beam search, or greedy."""
    spec = AttentionSpec(options.attention_layer, options.attention_head) \
        if options.attention else None
    n = options.num_captions
    if options.sampling:
        sampling = Sampling(options.temperature or 1.0, options.top_k, options.top_p, generator)
        hyps = sample_or_greedy(engine, array_ops(memory).repeat_rows(memory, n), rules,
                                options.max_words, sampling, spec, options.length_penalty)
        return [sorted(hyps[i:i + n], key=lambda h: -h.score) for i in range(0, len(hyps), n)]
    if options.beam_size == 1 and n == 1:
        return [[h] for h in sample_or_greedy(engine, memory, rules, options.max_words, None, spec,
                                               options.length_penalty)]
    return beam_search_hypotheses(engine, memory, rules, options.max_words,
                                  max(options.beam_size, n), options.length_penalty, n, spec)

