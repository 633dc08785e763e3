"""The transformer's pieces as plain functions: positions, masks, attention with a key/value cache.

The decoder layer is run here as nn.TransformerDecoderLayer.forward runs it (both norm_first
settings), so the training path (whole captions) and the cached path (a word at a time) share one
implementation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s encoding of `positions` (L,) -> (L, dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * freq[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)   # interleaved sin, cos


def grid_encoding(h: int, w: int, dim: int) -> torch.Tensor:
    """2-D position of each cell of an h x w grid, row-major -> (h*w, dim): half rows, half cols."""
    rows = sinusoid(torch.arange(h), dim // 2)                # (h, dim/2)
    cols = sinusoid(torch.arange(w), dim // 2)                # (w, dim/2)
    return torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)],
                     dim=-1).reshape(h * w, dim)


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal position of each token along the token axis (dim 1)."""

    def __init__(self, d_model: int, max_tokens: int):
        super().__init__()
        self.register_buffer("pe", sinusoid(torch.arange(max_tokens), d_model),
                             persistent=False)                          # (max_tokens, D)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # x: (B, T, D); position t of every sequence gets pe[offset + t]
        if offset + x.size(1) > self.pe.size(0):
            raise ValueError(f"sequence of {offset + x.size(1)} tokens is longer than "
                             f"model.max_tokens={self.pe.size(0)}")
        return x + self.pe[offset:offset + x.size(1)]


# -- the pieces of nn.TransformerDecoderLayer, read from its own weights: the teacher-forced pass
#    (CaptionModel.decode) and the cached step (torch_engine.step) both run these

def causal_mask(size: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where a query must not see a key (the future)."""
    return torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)


class _OnnxReshape(torch.autograd.Function):
    """`reshape` inside an ONNX export: one Reshape node of a constant shape (0 keeps that size)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape([x.size(i) if s == 0 else s for i, s in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """x.reshape(shape), where a 0 keeps x's size at that position (ONNX Reshape's rule).

    The ONNX export traces every size read off a tensor (x.shape) into a chain of shape nodes that
    runs at every decoding step; this one exports as a single Reshape with a constant shape.
    """
    if torch.onnx.is_in_onnx_export():
        return _OnnxReshape.apply(x, shape)
    return x.reshape([x.size(i) if s == 0 else s for i, s in enumerate(shape)])


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return reshape(x, 0, 0, num_heads, -1).transpose(1, 2)    # (N, T, D) -> (N, H, T, hd)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    return reshape(y.transpose(1, 2), 0, 0, -1)               # (N, H, T, hd) -> (N, T, D)


def in_proj(attn: nn.MultiheadAttention, part: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows `part` of the packed [q; k; v] input projection of `attn`."""
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[part]
    return attn.in_proj_weight[part], bias


# decoding asks a query or a few per sequence (a word, or a word of each beam): at that size the
# fused CPU kernel costs more than the two products (1.3 ms against ~0.1 ms a call at 32 images x 8
# heads, 56% of a decoding step: docs/benchmarks.md), so they run as plain products
FEW_QUERIES = 16


def attention_weights(attn: nn.MultiheadAttention, q, k) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) in fp32: (.., Tq, hd) x (.., Tk, hd) -> (.., Tq, Tk)."""
    return torch.softmax((q @ k.transpose(-1, -2)).float() * attn.head_dim ** -0.5, dim=-1)


def attention(attn: nn.MultiheadAttention, q, k, v,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
    # (.., Tq, hd) x (.., Tk, hd) -> (.., Tq, hd), with the attention dropout of `attn` while
    # training; allowed (.., Tq, Tk) bool: True where a query may see a key (None: everywhere).
    # scale: its default, as a constant
    if (allowed is None and not attn.training and q.size(-2) <= FEW_QUERIES
            and not torch.onnx.is_in_onnx_export()):
        return attention_weights(attn, q, k).to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                          dropout_p=attn.dropout if attn.training else 0.0,
                                          scale=1.0 / math.sqrt(attn.head_dim))


def feed_forward(layer: nn.TransformerDecoderLayer, x: torch.Tensor) -> torch.Tensor:
    return layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))


def decoder_layer(layer: nn.TransformerDecoderLayer, x: torch.Tensor, self_attention,
                  cross_attention) -> torch.Tensor:
    """nn.TransformerDecoderLayer.forward (both norm_first settings), its two attention blocks given
    as functions of their input: whole captions in training, one cached position in decoding."""
    if layer.norm_first:
        x = x + self_attention(layer.norm1(x))
        x = x + cross_attention(layer.norm2(x))
        return x + feed_forward(layer, layer.norm3(x))
    x = layer.norm1(x + self_attention(x))
    x = layer.norm2(x + cross_attention(x))
    return layer.norm3(x + feed_forward(layer, x))


def self_attention(layer: nn.TransformerDecoderLayer, x: torch.Tensor, past=None, allowed=None):
    """The layer's self-attention block: x (N, T, D) -> (output (N, T, D), keys, values
    (N, H, T', hd)).

    `past`: the (keys, values) of the positions before x (the decoding cache), prepended to x's
    own; `allowed` (N, 1, T, T'): True where a query may see a key (None: every key, as one new
    word may).
    """
    attn = layer.self_attn
    # the whole parameter, not a slice: autocast caches the bf16 copy of a parameter, not of a view
    qkv, D = F.linear(x, attn.in_proj_weight, attn.in_proj_bias), attn.embed_dim    # (N, T, 3D)
    # q, k, v (N, H, T, hd): slices at constant offsets (chunk() would be traced as a chain of
    # shape nodes run at every step)
    # one word a sequence (a decoding step): (N, 1, D) -> (N, H, 1, hd) is a reshape, no transpose
    # (the step graph's 24 Transpose nodes fewer)
    one, H = x.size(1) == 1, attn.num_heads
    q, k, v = (reshape(part, 0, H, 1, -1) if one else split_heads(part, H)
               for part in (qkv[..., i * D:(i + 1) * D] for i in range(3)))
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (N, H, T', hd)
    y = attention(attn, q, k, v, allowed)
    y = reshape(y, 0, 1, -1) if one else merge_heads(y)                          # (N, T, D)
    return layer.dropout1(attn.out_proj(y)), k, v


def cross_attention(layer: nn.TransformerDecoderLayer, x: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, weights: list | None = None):
    """The layer's cross-attention block: x (N, T, D) reads keys/values (M, H, L, hd) of M images.

    N = M * G: rows G*m .. G*m+G-1 of x read image m (G = 1 in training, whose keys are already
    picked per caption; G = the beams of one image when decoding). The G rows of one image are
    lined up on its query axis rather than copying its keys G times. With a `weights` list, the
    attention weights (N, H, T, L) are appended to it (computed as softmax(q k^T / sqrt(hd)): the
    fused kernel does not return them; no attention dropout).
    """
    attn = layer.multihead_attn
    # int(): a constant where the export traces it (its step graph feeds one word a row)
    T = int(x.size(1))
    # slices bounded by embed_dim, not by x's shape: a constant where the ONNX export traces it, so
    # the weights stay initializers (folded once, quantizable) rather than sliced at every step
    q = F.linear(x, *in_proj(attn, slice(0, attn.embed_dim)))                   # (N, T, D)
    q = split_heads(q.reshape(k.shape[:1] + (-1, attn.embed_dim)),
                    attn.num_heads)                                             # (M, H, G*T, hd)
    if weights is None:
        y = attention(attn, q, k, v)                                            # (M, H, G*T, hd)
    else:
        w = attention_weights(attn, q, k)                                       # (M, H, G*T, L)
        w = w.transpose(1, 2)                                                   # (M, G*T, H, L)
        weights.append(reshape(w, -1, T, 0, 0).transpose(1, 2))                 # (N, H, T, L)
        y = w.transpose(1, 2).to(v.dtype) @ v
    return layer.dropout2(attn.out_proj(reshape(merge_heads(y), -1, T, 0)))     # (N, T, D)


def cross_keys_values(layer: nn.TransformerDecoderLayer,
                      memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's cross-attention keys and values of memory (B, L, D) -> two (B, H, L, hd)."""
    attn, D = layer.multihead_attn, layer.multihead_attn.embed_dim    # D: a constant when traced
    if attn.in_proj_weight is None:
        raise NotImplementedError("the decoder reads packed q/k/v weights "
                                  "(kdim == vdim == d_model)")
    kv = F.linear(memory, *in_proj(attn, slice(D, 3 * D)))              # (B, L, 2D)
    k, v = kv.chunk(2, dim=-1)
    return split_heads(k, attn.num_heads), split_heads(v, attn.num_heads)

