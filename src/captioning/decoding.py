"""Turning transformer memory into word ids: greedy and beam search over a key/value cache.

Training runs the decoder layers over whole captions (`CaptionModel.decode`).
Decoding one word at a time that way re-runs every earlier word, and
re-projects the image memory into keys and values, at every step. Here the
same layers are run one position at a time instead:

    init_cache(model, memory)     cross-attention keys/values from memory, once per image
    step(model, cache, tokens)    one new word per sequence -> next-word logits (N, V);
                                  its self-attention keys/values are appended to the cache

so a step costs one position per sequence, whatever the length so far.
`greedy_reference` keeps the re-run-everything path: tests hold the two to the
same logits and tokens, and the benchmark times one against the other.

Both searches never emit <pad> or <bos>: neither is ever a word, and the
training path masks <pad> keys where the cache does not.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

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
def step(model: CaptionModel, cache: DecoderCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one word per sequence, tokens (N,), at position cache.length -> next-word logits (N, V).

    Mirrors nn.TransformerDecoderLayer.forward (both norm_first settings) and
    appends each layer's self-attention keys/values to `cache`.
    """
    x = model.embed_tokens(tokens[:, None], offset=cache.length)      # (N, 1, D)
    for i, layer in enumerate(model.transformer.decoder.layers):

        def cached_self_attention(y: torch.Tensor, layer=layer, i=i) -> torch.Tensor:
            # the one new query may see every cached key, itself included: no mask needed
            out, cache.self_k[i], cache.self_v[i] = self_attention(layer, y, past=(cache.self_k[i], cache.self_v[i]))
            return out                                                 # cache: (N, H, t+1, hd)

        x = decoder_layer(layer, x, cached_self_attention,
                          lambda y, layer=layer, i=i: cross_attention(layer, y, cache.cross_k[i], cache.cross_v[i]))
    if model.transformer.decoder.norm is not None:
        x = model.transformer.decoder.norm(x)
    return model.head(x)[:, 0]                                         # (N, V)


def _words_only(logits: torch.Tensor, pad_id: int, bos: int) -> torch.Tensor:
    """Logits with <pad> and <bos> ruled out: neither is ever a word."""
    return logits.index_fill(-1, torch.tensor([pad_id, bos], device=logits.device), float("-inf"))


# -----------------------------------------------------------------------------
# greedy

@torch.no_grad()
def greedy(model: CaptionModel, memory: torch.Tensor, bos: int, eos: int, max_words: int) -> list[list[int]]:
    """Batched greedy decoding; each sequence stops at its own <eos>.

    memory: (B, L, D) from `model.encode`. Returns B lists of word ids
    (without <bos>/<eos>), at most `max_words` words each. A sequence that
    reaches <eos> leaves the batch, so the others do not carry it along.
    """
    B = memory.size(0)
    if B == 0:
        return []
    cache = init_cache(model, memory)
    out = [[] for _ in range(B)]
    alive = list(range(B))                                            # the image each row of the cache decodes
    tokens = torch.full((B,), bos, dtype=torch.long, device=memory.device)
    for _ in range(max_words):
        tokens = _words_only(step(model, cache, tokens), model.pad_id, bos).argmax(-1)   # (n,)
        going = tokens != eos
        for b, word in zip(alive, tokens.tolist()):
            if word != eos:
                out[b].append(word)
        if not going.all():
            if not going.any():
                break
            keep = going.nonzero().squeeze(1)
            cache, tokens = cache.select(keep, keep), tokens[keep]
            alive = [alive[j] for j in keep.tolist()]
    return out


@torch.no_grad()
def greedy_reference(model: CaptionModel, memory: torch.Tensor, bos: int, eos: int, max_words: int) -> list[list[int]]:
    """`greedy` the slow way: the training path (`model.decode`) over the whole prefix at every step."""
    B = memory.size(0)
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=memory.device)
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for _ in range(max_words):
        logits = _words_only(model.decode(memory, tokens)[:, -1], model.pad_id, bos)   # (B, V)
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

@torch.no_grad()
def beam_search(model: CaptionModel, memory: torch.Tensor, bos: int, eos: int, max_words: int, beam_size: int = 3,
                length_penalty: float = 1.0, n_best: int = 1) -> list[list[tuple[list[int], float]]]:
    """Batched beam search: B images x K beams flattened into one batch of B*K sequences.

    A hypothesis scores  sum of log-probs / len ** length_penalty,  len = words
    + <eos> (plain length normalisation: 1.0 = mean log-prob per token, 0.0 = the
    raw sum). Live beams are ranked by the raw sum, finished ones by the score.
    As in fairseq, an <eos> candidate finishes a hypothesis when it ranks in the
    top K of its image; as in Hugging Face's (early_stopping=False), an image
    stops once it holds K finished hypotheses and its K-th best scores at least
    what its best live beam would score if it ended now. beam_size=1 is then
    exactly `greedy`.

    Returns per image its n_best (ids without <bos>/<eos>, score), best first;
    when fewer than n_best finished within `max_words` words, the best live
    beams (scored over their words) fill in.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={beam_size}")
    B, K, device = memory.size(0), beam_size, memory.device
    if B == 0:
        return []
    cache = init_cache(model, memory, group=K)
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
    images = list(range(B))                   # images still searching; the j-th owns rows j*K..j*K+K-1
    words = [[[] for _ in range(K)] for _ in range(B)]                # per searching image, the words of each beam
    # every beam starts as <bos>; -inf on all but the first so the first step expands just one of them
    sums = torch.full((B, K), float("-inf"), device=device)
    sums[:, 0] = 0.0
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    score = functools.partial(_length_score, length_penalty=length_penalty)
    for t in range(max_words):
        logp = _words_only(step(model, cache, tokens).float(), model.pad_id, bos).log_softmax(-1)   # (n*K, V)
        V = logp.size(-1)
        candidates = (sums[:, :, None] + logp.view(-1, K, V)).view(-1, K * V)            # (n, K*V)
        # a beam has one <eos>, so 2K candidates hold K that go on
        top_sums, top_idx = candidates.topk(min(2 * K, K * V), dim=1)                     # (n, 2K)
        beams, still = [], []                     # (row, word, sum, words) of the next beams; images going on
        for j, (b, cand_sums, cand_idx) in enumerate(zip(images, top_sums.tolist(), top_idx.tolist())):
            going = _expand_image(j, cand_sums, cand_idx, words[j], finished[b], K, V, eos, score)
            if _image_done(going, finished[b], K, score(going[0][2], t + 1) if going else float("-inf")):
                continue
            still.append(j)
            beams += going + [going[0][:2] + (float("-inf"), [])] * (K - len(going))   # dead fillers (tiny vocab)
        if not still:
            break
        rows, next_tokens, next_sums, next_words = zip(*beams)
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
        cache = cache.select(as_tensor(rows), None if len(still) == len(images) else as_tensor(still))
        tokens = as_tensor(next_tokens)
        sums = torch.tensor(next_sums, device=device).view(-1, K)
        words = [list(next_words[i:i + K]) for i in range(0, len(next_words), K)]
        images = [images[j] for j in still]
    else:
        # max_words words and still fewer than n_best finished: the live beams fill in
        for j, b in enumerate(images):
            if len(finished[b]) < n_best:
                finished[b] += [(ws, score(total, len(ws))) for ws, total in zip(words[j], sums[j].tolist())
                                if total > float("-inf")]
    return [sorted(hyps, key=lambda h: -h[1])[:n_best] for hyps in finished]


def _length_score(total: float, length: int, length_penalty: float) -> float:
    return total / max(length, 1) ** length_penalty


def _expand_image(j: int, cand_sums: list[float], cand_idx: list[int], words: list[list[int]],
                  finished: list, K: int, V: int, eos: int, score) -> list[tuple]:
    """Image j's top candidates (best first) -> its up to K beams that go on, as (row, word, sum, words).

    An <eos> candidate ranked in the top K finishes its hypothesis (appended to `finished`).
    """
    going = []
    for rank, (total, idx) in enumerate(zip(cand_sums, cand_idx)):
        if total == float("-inf") or len(going) == K:
            break
        k, word = divmod(idx, V)
        if word != eos:
            going.append((j * K + k, word, total, words[k] + [word]))
        elif rank < K:
            finished.append((words[k], score(total, len(words[k]) + 1)))
    return going


def _image_done(going: list, finished: list, K: int, reach: float) -> bool:
    """No beam goes on, or K finished hypotheses of which the K-th best scores at least `reach`.

    `reach`: the best live sum scored at the length of this step's finished hypotheses: Hugging
    Face's heuristic bound (exact for length_penalty=0, as sums only fall; a longer length could
    still lift a score). It never beats a finished sibling ranked above it, so beam_size=1 is greedy.
    """
    best = sorted((s for _, s in finished), reverse=True)
    return not going or (len(best) >= K and best[K - 1] >= reach)
