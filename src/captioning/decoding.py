"""Turning transformer memory into word ids: greedy and beam search over a key/value cache.

Training runs the decoder layers over whole captions (`CaptionModel.decode`).
Decoding one word at a time that way re-runs every earlier word, and
re-projects the image memory into keys and values, at every step. Here the
same layers are run one position at a time instead:

    init_cache(model, memory)     cross-attention keys/values from memory, once per image
    step(model, cache, tokens)    one new word per sequence -> next-word logits (N, V);
                                  its self-attention keys/values are appended to the cache

so a step costs one position per sequence, whatever the length so far.

The searches below never touch the model itself: they ask an engine (`Engine`: `init_cache`,
`step`) for the cache and the next-word logits. `TorchEngine` is the model above; the ONNX
Runtime engine (`onnx_engine.OrtEngine`) runs the exported graphs of the same two functions.
Wherever a search takes `model`, either a CaptionModel or an engine may be passed.
`greedy_reference` keeps the re-run-everything path: tests hold the two to the
same logits and tokens, and the benchmark times one against the other.

Both searches never emit <pad> or <bos>: neither is ever a word, and the
training path masks <pad> keys where the cache does not.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from .model import CaptionModel, cross_attention, cross_keys_values, decoder_layer, self_attention

# -----------------------------------------------------------------------------
# the cached decoder: the weights of nn.TransformerDecoder, one position at a time

@dataclass
class DecoderCache:
    """Keys and values of every decoder layer for N sequences decoded side by side.

    The N rows are grouped `group` at a time per image (beam search: the K
    beams of one image), and rows of one group share their image's
    cross-attention keys/values rather than holding G copies of them.
    """
    self_k: list[torch.Tensor]    # per layer (N, H, T, hd): one entry per word fed so far
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]   # per layer (M, H, L, hd): from memory, computed once; N = M * group
    cross_v: list[torch.Tensor]

    @property
    def length(self) -> int:
        """Words fed so far, which is also the position of the next one."""
        return self.self_k[0].size(2)

    @property
    def group(self) -> int:
        return self.self_k[0].size(0) // self.cross_k[0].size(0)

    def select(self, rows: torch.Tensor, images: torch.Tensor | None = None) -> DecoderCache:
        """Keep sequences `rows` (N',) and images `images` (M',), in that order.

        Reordering beams within their images leaves the images as they are
        (images=None); dropping finished sequences or images passes both.
        """
        def pick(ts: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
            return [t.index_select(0, index) for t in ts]

        cross_k, cross_v = (self.cross_k, self.cross_v) if images is None else \
            (pick(self.cross_k, images), pick(self.cross_v, images))
        cache = DecoderCache(pick(self.self_k, rows), pick(self.self_v, rows), cross_k, cross_v)
        assert cache.self_k[0].size(0) % cache.cross_k[0].size(0) == 0, "rows must be whole groups per image"
        return cache


@torch.no_grad()
def init_cache(model: CaptionModel, memory: torch.Tensor, group: int = 1) -> DecoderCache:
    """An empty cache for memory.size(0) * group sequences, `group` per image of memory (B, L, D)."""
    M = memory.size(0)
    self_k, self_v, cross_k, cross_v = [], [], [], []
    for layer in model.transformer.decoder.layers:
        k, v = cross_keys_values(layer, memory)                            # (M, H, L, hd)
        cross_k.append(k)
        cross_v.append(v)
        # empty, in the dtype the projections give (bf16 under autocast) so appending never upcasts
        empty = k.new_empty(M * group, k.size(1), 0, k.size(-1))
        self_k.append(empty)
        self_v.append(empty)
    return DecoderCache(self_k, self_v, cross_k, cross_v)


@torch.no_grad()
def step(model: CaptionModel, cache: DecoderCache, tokens: torch.Tensor, attention: list | None = None) -> torch.Tensor:
    """Feed one word per sequence, tokens (N,), at position cache.length -> next-word logits (N, V).

    Mirrors nn.TransformerDecoderLayer.forward (both norm_first settings) and
    appends each layer's self-attention keys/values to `cache`. With an `attention`
    list, each layer's cross-attention weights (N, H, L) are appended to it.
    """
    return decoder_step(model, model.embed_tokens(tokens[:, None], offset=cache.length), cache, attention)


def decoder_step(model: CaptionModel, x: torch.Tensor, cache: DecoderCache, attention: list | None = None
                 ) -> torch.Tensor:
    """`step` after the embedding: x (N, 1, D), the embedded words -> logits (N, V). The export traces this too."""
    return model.head(decoder_hidden(model, x, cache, attention))[:, 0]            # (N, V)


def decoder_hidden(model: CaptionModel, x: torch.Tensor, cache: DecoderCache, attention: list | None = None
                   ) -> torch.Tensor:
    """`decoder_step` without the output layer: x (N, 1, D) -> the decoder's last hidden state (N, 1, D)."""
    weights = None if attention is None else []
    for i, layer in enumerate(model.transformer.decoder.layers):

        def cached_self_attention(y: torch.Tensor, layer=layer, i=i) -> torch.Tensor:
            # the one new query may see every cached key, itself included: no mask needed
            out, cache.self_k[i], cache.self_v[i] = self_attention(layer, y, past=(cache.self_k[i], cache.self_v[i]))
            return out                                                 # cache: (N, H, t+1, hd)

        x = decoder_layer(layer, x, cached_self_attention,
                          lambda y, layer=layer, i=i: cross_attention(layer, y, cache.cross_k[i], cache.cross_v[i],
                                                                      weights))
    if attention is not None:
        attention.extend(w[:, :, 0] for w in weights)                  # per layer (N, H, L)
    if model.transformer.decoder.norm is not None:
        x = model.transformer.decoder.norm(x)
    return x


# -----------------------------------------------------------------------------
# the engine the searches call: the model above, or exported graphs of the same two functions

class Engine(Protocol):
    """What the search code needs of a model: a cache for memory's images, and one step of every row."""
    pad_id: int

    def init_cache(self, memory: torch.Tensor, group: int = 1) -> DecoderCache: ...

    def step(self, cache: DecoderCache, tokens: torch.Tensor, attention: list | None = None) -> torch.Tensor: ...


class TorchEngine:
    """The PyTorch CaptionModel as an Engine: `init_cache` and `step` above."""

    def __init__(self, model: CaptionModel):
        self.model, self.pad_id = model, model.pad_id

    def init_cache(self, memory: torch.Tensor, group: int = 1) -> DecoderCache:
        return init_cache(self.model, memory, group)

    def step(self, cache: DecoderCache, tokens: torch.Tensor, attention: list | None = None) -> torch.Tensor:
        return step(self.model, cache, tokens, attention)


def engine_of(model: CaptionModel | Engine) -> Engine:
    """A CaptionModel wrapped as an Engine; an engine as it is."""
    return TorchEngine(model) if isinstance(model, torch.nn.Module) else model


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

    def apply(self, logits: torch.Tensor, words: list[list[int]]) -> torch.Tensor:
        """logits (N, V) of the next word after each row's `words` -> the same with banned words at -inf."""
        logits = logits.index_fill(-1, torch.tensor([self.pad, self.bos], device=logits.device), float("-inf"))
        rows, banned = [], []
        for i, ws in enumerate(words):
            ban = self._banned(ws)
            rows += [i] * len(ban)
            banned += ban
        if rows:
            logits = logits.index_put((torch.tensor(rows, device=logits.device),
                                       torch.tensor(banned, device=logits.device)),
                                      torch.tensor(float("-inf"), device=logits.device, dtype=logits.dtype))
            stuck = torch.isinf(logits).all(-1)                        # everything banned (a tiny vocabulary)
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
    and the smallest set of them whose probability reaches top_p, drawn with `generator`."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / self.temperature                       # (N, V)
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)   # probability of the words ranked above
            logits = logits.scatter(-1, order, ordered.masked_fill(before >= self.top_p, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs.cpu() if self.generator is not None and self.generator.device.type == "cpu"
                                 else probs, 1, generator=self.generator).squeeze(1).to(logits.device)


@dataclass
class AttentionSpec:
    """Which cross-attention map each word keeps: the mean over heads and layers, or one layer / head."""
    layer: int | None = None
    head: int | None = None

    def reduce(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Per layer (N, H, L) -> (N, L), a map that sums to 1 over the grid."""
        w = torch.stack(weights) if self.layer is None else weights[self.layer][None]   # (layers, N, H, L)
        w = w.mean(2) if self.head is None else w[:, :, self.head]
        return w.float().mean(0)


@dataclass
class Hypothesis:
    """One caption of one image: word ids (no <bos>/<eos>), the sum of their log-probabilities (with
    <eos> when it ended), the length-penalised score search ranked it by, and a map per word, <eos> too."""
    ids: list[int]
    logprob: float
    score: float
    maps: torch.Tensor | None = None        # (words + 1, L) when it ended, (words, L) when cut at max_words
    ended: bool = True                      # it chose <eos> (else max_words cut it)


def _length_score(total: float, length: int, length_penalty: float) -> float:
    return total / max(length, 1) ** length_penalty


def _next_word(engine: Engine, cache: DecoderCache, tokens: torch.Tensor, words: list[list[int]], rules: Rules,
               attention: AttentionSpec | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of every row: log-probabilities (N, V) under the rules, and each row's map (N, L) if kept."""
    weights = None if attention is None else []
    logits = engine.step(cache, tokens, weights)
    maps = None if attention is None else attention.reduce(weights)
    return rules.apply(logits.float(), words).log_softmax(-1), maps


# -----------------------------------------------------------------------------
# greedy and sampling

@torch.no_grad()
def sample_or_greedy(model: CaptionModel | Engine, memory: torch.Tensor, rules: Rules, max_words: int,
                     sampling: Sampling | None = None, attention: AttentionSpec | None = None,
                     length_penalty: float = 1.0) -> list[Hypothesis]:
    """One caption per image of memory (B, L, D): the likeliest word at each step, or a sampled one.

    Each sequence stops at its own <eos> and leaves the batch, so the others do not carry it along.
    """
    B, engine = memory.size(0), engine_of(model)
    cache = engine.init_cache(memory)
    words, sums = [[] for _ in range(B)], [0.0] * B
    maps = [[] for _ in range(B)]
    alive = list(range(B))                                            # the image each row of the cache decodes
    tokens = torch.full((B,), rules.bos, dtype=torch.long, device=memory.device)
    ended = [False] * B
    for _ in range(max_words):
        logp, step_maps = _next_word(engine, cache, tokens, [words[b] for b in alive], rules, attention)
        tokens = logp.argmax(-1) if sampling is None else sampling.choose(logp)     # (n,)
        picked = logp.gather(1, tokens[:, None])[:, 0].tolist()
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
            index = torch.tensor(keep, device=memory.device)
            cache, tokens, alive = cache.select(index, index), tokens[index], [alive[j] for j in keep]
    return [Hypothesis(words[b], sums[b], _length_score(sums[b], len(words[b]) + ended[b], length_penalty),
                       torch.stack(maps[b]) if maps[b] else None, ended[b]) for b in range(B)]


@torch.no_grad()
def greedy(model: CaptionModel | Engine, memory: torch.Tensor, bos: int, eos: int, max_words: int,
           rules: Rules | None = None) -> list[list[int]]:
    """Batched greedy decoding: B lists of word ids (without <bos>/<eos>), at most `max_words` each."""
    if memory.size(0) == 0:
        return []
    rules = rules or Rules(model.pad_id, bos, eos)
    return [h.ids for h in sample_or_greedy(model, memory, rules, max_words)]


@torch.no_grad()
def greedy_reference(model: CaptionModel, memory: torch.Tensor, bos: int, eos: int, max_words: int) -> list[list[int]]:
    """`greedy` the slow way: the training path (`model.decode`) over the whole prefix at every step."""
    B = memory.size(0)
    rules = Rules(model.pad_id, bos, eos)
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=memory.device)
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for _ in range(max_words):
        logits = rules.apply(model.decode(memory, tokens)[:, -1], [[]] * B)   # (B, V)
        nxt = logits.argmax(-1).masked_fill(done, eos)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[:row.index(eos)] if eos in row else row)
    return out


# -----------------------------------------------------------------------------
# beam search

@dataclass
class _Beams:
    """The live beams of the images still searching: K per image, row j*K+k of the cache."""
    images: list[int]                      # which image each searching group is
    words: list[list[list[int]]]           # [group][beam] -> word ids so far
    maps: list[list[list[torch.Tensor]]]   # [group][beam] -> a map per word so far (empty without attention)
    sums: torch.Tensor                     # (groups, K) summed log-probabilities


@torch.no_grad()
def beam_search_hypotheses(model: CaptionModel | Engine, memory: torch.Tensor, rules: Rules, max_words: int,
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
    B, K, device, engine = memory.size(0), beam_size, memory.device, engine_of(model)
    cache = engine.init_cache(memory, group=K)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    sums = torch.full((B, K), float("-inf"), device=device)
    sums[:, 0] = 0.0           # every beam starts as <bos>; -inf on all but the first expands just one of them
    beams = _Beams(list(range(B)), [[[] for _ in range(K)] for _ in range(B)],
                   [[[] for _ in range(K)] for _ in range(B)], sums)
    tokens = torch.full((B * K,), rules.bos, dtype=torch.long, device=device)
    score = functools.partial(_length_score, length_penalty=length_penalty)
    for t in range(max_words):
        logp, maps = _next_word(engine, cache, tokens, [w for ws in beams.words for w in ws], rules, attention)
        V = logp.size(-1)
        candidates = (beams.sums[:, :, None] + logp.view(-1, K, V)).view(-1, K * V)      # (n, K*V)
        # a beam has one <eos>, so 2K candidates hold K that go on
        top_sums, top_idx = candidates.topk(min(2 * K, K * V), dim=1)                     # (n, 2K)
        chosen, still = [], []                  # (row, word, sum, words, maps) of the next beams; groups going on
        for j, (cand_sums, cand_idx) in enumerate(zip(top_sums.tolist(), top_idx.tolist())):
            b = beams.images[j]
            going = _expand_image(j, cand_sums, cand_idx, beams, maps, finished[b], K, V, rules.eos, score)
            if _image_done(going, finished[b], K, score(going[0][2], t + 1) if going else float("-inf")):
                continue
            still.append(j)
            chosen += going + [going[0][:2] + (float("-inf"), [], [])] * (K - len(going))   # dead fillers
        if not still:
            break
        cache, tokens, beams = _advance(cache, beams, chosen, still, K, device)
    else:
        _fill_in(beams, finished, n_best, score)
    return [sorted(hyps, key=lambda h: -h.score)[:n_best] for hyps in finished]


def _expand_image(j: int, cand_sums: list[float], cand_idx: list[int], beams: _Beams, maps: torch.Tensor | None,
                  finished: list[Hypothesis], K: int, V: int, eos: int, score) -> list[tuple]:
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
                                       torch.stack(kept) if kept else None))
    return going


def _image_done(going: list, finished: list[Hypothesis], K: int, reach: float) -> bool:
    """No beam goes on, or K finished hypotheses of which the K-th best scores at least `reach`.

    `reach`: the best live sum scored at the length of this step's finished hypotheses: Hugging
    Face's heuristic bound (exact for length_penalty=0, as sums only fall; a longer length could
    still lift a score). It never beats a finished sibling ranked above it, so beam_size=1 is greedy.
    """
    best = sorted((h.score for h in finished), reverse=True)
    return not going or (len(best) >= K and best[K - 1] >= reach)


def _advance(cache: DecoderCache, beams: _Beams, chosen: list[tuple], still: list[int], K: int, device):
    """The cache, next tokens and beams of the groups still searching, in the order of `chosen`."""
    rows, next_tokens, next_sums, next_words, next_maps = zip(*chosen)
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    cache = cache.select(as_tensor(rows), None if len(still) == len(beams.images) else as_tensor(still))
    group = lambda xs: [list(xs[i:i + K]) for i in range(0, len(xs), K)]   # noqa: E731
    return cache, as_tensor(next_tokens), _Beams([beams.images[j] for j in still], group(next_words),
                                                 group(next_maps), torch.tensor(next_sums, device=device).view(-1, K))


def _fill_in(beams: _Beams, finished: list[list[Hypothesis]], n_best: int, score) -> None:
    """max_words words and still fewer than n_best finished: the live beams fill in."""
    for j, b in enumerate(beams.images):
        if len(finished[b]) < n_best:
            finished[b] += [Hypothesis(ws, total, score(total, len(ws)), torch.stack(ms) if ms else None, False)
                            for ws, ms, total in zip(beams.words[j], beams.maps[j], beams.sums[j].tolist())
                            if total > float("-inf")]


@torch.no_grad()
def beam_search(model: CaptionModel | Engine, memory: torch.Tensor, bos: int, eos: int, max_words: int,
                beam_size: int = 3, length_penalty: float = 1.0, n_best: int = 1
                ) -> list[list[tuple[list[int], float]]]:
    """Per image its n_best (ids without <bos>/<eos>, score), best first (see beam_search_hypotheses)."""
    if memory.size(0) == 0:
        return []
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


@torch.no_grad()
def search(model: CaptionModel | Engine, memory: torch.Tensor, options: DecodeOptions, rules: Rules,
           generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
    """Per image of memory (B, L, D) its `num_captions` hypotheses, best first: sampled, by beam search, or greedy."""
    if memory.size(0) == 0:
        return []
    spec = AttentionSpec(options.attention_layer, options.attention_head) if options.attention else None
    n = options.num_captions
    if options.sampling:
        sampling = Sampling(options.temperature or 1.0, options.top_k, options.top_p, generator)
        hyps = sample_or_greedy(model, memory.repeat_interleave(n, 0), rules, options.max_words, sampling, spec,
                                options.length_penalty)
        return [sorted(hyps[i:i + n], key=lambda h: -h.score) for i in range(0, len(hyps), n)]
    if options.beam_size == 1 and n == 1:
        return [[h] for h in sample_or_greedy(model, memory, rules, options.max_words, None, spec,
                                               options.length_penalty)]
    return beam_search_hypotheses(model, memory, rules, options.max_words, max(options.beam_size, n),
                                  options.length_penalty, n, spec)
