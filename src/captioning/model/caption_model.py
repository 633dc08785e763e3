"""The caption model: ResNet grid features -> nn.Transformer -> next-word logits.

    image (B, 3, H, W)
      -> Encoder: a torchvision ResNet without its pooling and classifier
      -> grid features (B, h*w, C)                  # 7x7x2048 for ResNet-152 at 224 px
      -> Linear(C, d_model) + 2-D sinusoidal position of each grid cell
      -> nn.Transformer encoder -> memory (B, h*w, d_model)
    tokens (N, T) -> embedding * sqrt(d_model) + 1-D sinusoidal position of each word
      -> nn.Transformer decoder (causal + padding masks, cross-attends to its image's memory)
      -> Linear(d_model, V) -> logits (N, T, V)

A batch may hold several captions per image: `image_index` (N,) maps each
caption to its image, so the image side runs once per image -- the ResNet, the
transformer encoder, and each decoder layer's cross-attention keys and values.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .backbone import Encoder
from .kv_cache import DecoderCache
from .layers import (
    PositionalEncoding,
    causal_mask,
    cross_attention,
    cross_keys_values,
    decoder_layer,
    grid_encoding,
    self_attention,
)


class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        self.encoder = Encoder(cfg.backbone, cfg.pretrained, cfg.train_backbone,
                               cfg.backbone_stages)
        self.project = nn.Linear(self.encoder.out_channels, cfg.d_model)
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        # std d^-1/2, so that embed * sqrt(d) has unit scale like the positions and the image side
        # (PyTorch's N(0, 1) would make words sqrt(d) times louder and drown out both)
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.positions = PositionalEncoding(cfg.d_model, cfg.max_tokens)
        self.dropout = nn.Dropout(cfg.dropout)
        self.transformer = nn.Transformer(
            d_model=cfg.d_model, nhead=cfg.num_heads, num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers, dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout, batch_first=True)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    # -- image side: once per image
    def memory(self, features: torch.Tensor) -> torch.Tensor:
        """Grid features (B, L, C) -> transformer memory (B, L, d_model)."""
        L = features.size(1)
        side = math.isqrt(L)
        h, w = (side, side) if side * side == L else (1, L)
        positions = grid_encoding(h, w, self.cfg.d_model).to(
            features.device, self.project.weight.dtype)                     # (L, D)
        x = self.project(features) + positions
        return self.transformer.encoder(self.dropout(x))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> memory (B, h*w, d_model)."""
        return self.memory(self.encoder(images))

    # -- word side
    def embed_tokens(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(N, T) ids -> (N, T, d_model), scaled embedding plus word position."""
        return self.dropout(self.positions(self.embed(tokens) * math.sqrt(self.cfg.d_model),
                                           offset))

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor,
               image_index: torch.Tensor | None = None,
               attention: list | None = None) -> torch.Tensor:
        """memory (B, L, D) and tokens (N, T) -> logits (N, T, V); caption n reads image
        image_index[n] (default: image n).

        nn.TransformerDecoder's layers, run as nn.TransformerDecoderLayer.forward runs them (both
        norm_first settings; a test holds the two to the same logits), but each layer projects the
        cross-attention keys and values of the B images once and lets their captions share them,
        instead of projecting memory copied to every caption. Self-attention masks the future and
        every <pad> key. With an `attention` list, each layer's cross-attention weights
        (N, H, T, L) are appended to it.
        """
        x = self.embed_tokens(tokens)                                      # (N, T, D)
        T = tokens.size(1)
        # (N, 1, T, T): neither the future nor a <pad> key
        allowed = ~causal_mask(T, tokens.device) & (tokens != self.pad_id)[:, None, None, :]
        for layer in self.transformer.decoder.layers:
            k, v = cross_keys_values(layer, memory)                        # (B, H, L, hd)
            if image_index is not None:
                k, v = (k.index_select(0, image_index),
                        v.index_select(0, image_index))                    # (N, H, L, hd)
            x = decoder_layer(layer, x, lambda y: self_attention(layer, y, allowed=allowed)[0],
                              lambda y: cross_attention(layer, y, k, v, attention))
        if self.transformer.decoder.norm is not None:
            x = self.transformer.decoder.norm(x)
        return self.head(x)

    def forward(self, tokens: torch.Tensor, image_index: torch.Tensor | None = None, *,
                images: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (N, T, V) for `tokens` (N, T) = <bos> w1 ... wn <eos> <pad>...

        Exactly one of `images` (B, 3, H, W) or `features` (B, L, C), the frozen encoder's cached
        output; `image_index` (N,) maps captions to images (default: one caption each).
        """
        if (images is None) == (features is None):
            raise ValueError("CaptionModel takes images= or features=, exactly one of them")
        memory = self.memory(features if features is not None
                             else self.encoder(images))                    # (B, L, D)
        return self.decode(memory, tokens, image_index)


    # -- the search's engine (decode.search.Engine): the decoder one position at a time over a
    #    key/value cache
    @torch.no_grad()
    def init_cache(self, memory: torch.Tensor, group: int = 1) -> DecoderCache:
        """An empty cache for M * group sequences, `group` per image of memory (M, L, D)."""
        M = memory.size(0)
        self_k, self_v, cross_k, cross_v = [], [], [], []
        for layer in self.transformer.decoder.layers:
            k, v = cross_keys_values(layer, memory)                            # (M, H, L, hd)
            # contiguous once: every step reads them, and a strided view (a slice of the packed
            # k/v projection) would be copied by each step's product instead
            cross_k.append(k.contiguous())
            cross_v.append(v.contiguous())
            # empty, in the dtype the projections give (bf16 under autocast): appending never
            # upcasts
            empty = k.new_empty(M * group, k.size(1), 0, k.size(-1))
            self_k.append(empty)
            self_v.append(empty)
        return DecoderCache(self_k, self_v, cross_k, cross_v)

    @torch.no_grad()
    def step(self, cache: DecoderCache, tokens: torch.Tensor,
             attention: list | None = None) -> torch.Tensor:
        """One word per sequence, tokens (N,), at position cache.length -> next-word logits (N, V).

        Appends each layer's self-attention keys/values to `cache`; with an `attention` list, each
        layer's cross-attention weights (N, H, L) are appended to it.
        """
        return self.decoder_step(self.embed_tokens(tokens[:, None], offset=cache.length), cache,
                                 attention)

    def decoder_step(self, x: torch.Tensor, cache: DecoderCache,
                     attention: list | None = None) -> torch.Tensor:
        """`step` after the embedding: x (N, 1, D) -> logits (N, V). The export traces this too."""
        return self.head(self.decoder_hidden(x, cache, attention))[:, 0]            # (N, V)

    def decoder_hidden(self, x: torch.Tensor, cache: DecoderCache,
                       attention: list | None = None) -> torch.Tensor:
        """`decoder_step` without the output layer: x (N, 1, D) -> last hidden state (N, 1, D)."""
        weights = None if attention is None else []
        for i, layer in enumerate(self.transformer.decoder.layers):

            def cached_self_attention(y: torch.Tensor, layer=layer, i=i) -> torch.Tensor:
                # the one new query may see every cached key, itself included: no mask needed
                out, cache.self_k[i], cache.self_v[i] = self_attention(
                    layer, y, past=(cache.self_k[i], cache.self_v[i]))
                return out                                                 # cache: (N, H, t+1, hd)

            x = decoder_layer(layer, x, cached_self_attention,
                              lambda y, layer=layer, i=i: cross_attention(
                                  layer, y, cache.cross_k[i], cache.cross_v[i], weights))
        if attention is not None:
            attention.extend(w[:, :, 0] for w in weights)                  # per layer (N, H, L)
        if self.transformer.decoder.norm is not None:
            x = self.transformer.decoder.norm(x)
        return x


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int = 0) -> CaptionModel:
    return CaptionModel(cfg, vocab_size, pad_id)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


# the engine's two calls as functions: init_cache(model, memory), step(model, cache, tokens)
init_cache, step = CaptionModel.init_cache, CaptionModel.step
