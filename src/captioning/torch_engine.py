"""The PyTorch engine of the search: the model's decoder one position at a time, over a key/value cache.

Training runs the decoder layers over whole captions (`CaptionModel.decode`). Decoding one word at a
time that way re-runs every earlier word, and re-projects the image memory into keys and values, at
every step. Here the same layers are run one position at a time instead:

    init_cache(model, memory)     cross-attention keys/values from memory, once per image
    step(model, cache, tokens)    one new word per sequence -> next-word logits (N, V);
                                  its self-attention keys/values are appended to the cache

so a step costs one position per sequence, whatever the length so far. `TorchEngine` wraps the two
as the `decoding.Engine` the search code calls, and `TorchOps` gives the search its few array
operations on tensors (on the model's device). `greedy_reference` keeps the re-run-everything path:
tests hold the two to the same logits and tokens, and the benchmark times one against the other.
"""
from __future__ import annotations

import numpy as np
import torch

from .decoding import DecoderCache, Rules, inverse_cdf
from .model import CaptionModel, cross_attention, cross_keys_values, decoder_layer, self_attention


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


class TorchEngine:
    """The PyTorch CaptionModel as a decoding.Engine: `init_cache` and `step` above."""

    def __init__(self, model: CaptionModel):
        self.model, self.pad_id = model, model.pad_id

    def init_cache(self, memory: torch.Tensor, group: int = 1) -> DecoderCache:
        return init_cache(self.model, memory, group)

    def step(self, cache: DecoderCache, tokens: torch.Tensor, attention: list | None = None) -> torch.Tensor:
        return step(self.model, cache, tokens, attention)


class TorchOps:
    """The search's array operations (decoding.NumpyOps, on tensors): new tensors go on `device`."""

    def __init__(self, device: torch.device):
        self.device = device

    def _dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name == "float64" and self.device.type == "mps" else getattr(torch, name)  # no fp64

    def asarray(self, values, dtype: str) -> torch.Tensor:
        return torch.tensor(values, dtype=self._dtype(dtype), device=self.device)

    def cast(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        return x.to(self._dtype(dtype), copy=True)

    @staticmethod
    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        return x.log_softmax(-1)

    @staticmethod
    def softmax(x: torch.Tensor) -> torch.Tensor:
        return x.softmax(-1)

    @staticmethod
    def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x.topk(k, dim=-1))

    @staticmethod
    def sort_descending(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x.sort(dim=-1, descending=True, stable=True))    # ties in index order, as NumpyOps

    @staticmethod
    def scatter(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return x.scatter(-1, index, values)

    @staticmethod
    def where(mask: torch.Tensor, value: float, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(mask, value)

    @staticmethod
    def stack(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs)

    @staticmethod
    def concat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs)

    @staticmethod
    def repeat_rows(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.repeat_interleave(n, 0)

    @staticmethod
    def pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(-1, index[:, None])[:, 0]

    def multinomial(self, probs: torch.Tensor, generator) -> torch.Tensor:
        """One word per row of probs (N, V): torch's own draw with a torch.Generator (or torch's global one,
        None), the search's inverse transform with a numpy Generator (Captioner's: either engine draws alike)."""
        if isinstance(generator, np.random.Generator):
            return inverse_cdf(self, probs, generator)
        return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu"
                                 else probs, 1, generator=generator).squeeze(1).to(probs.device)


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
