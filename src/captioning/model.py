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

import copy
import math
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import EnvironmentProblem, ModelConfig


class Encoder(nn.Module):
    """A torchvision ResNet up to stage `stages` (4 = all of it); frozen unless `trainable`.

    The submodules keep torchvision's names (conv1, bn1, layer1, ...), so
    ImageNet weights load with strict=True. Fewer stages give a finer grid
    (stride 8 after layer2, 16 after layer3, 32 after layer4) and a network
    that trains from scratch far faster: the embedded Shapes default uses that.
    """

    def __init__(self, backbone: str = "resnet152", pretrained: bool = True, trainable: bool = False, stages: int = 4):
        super().__init__()
        resnet = _resnet(backbone, pretrained)
        dropped = ("avgpool", "fc") + tuple(f"layer{i}" for i in range(stages + 1, 5))
        self.body = nn.Sequential(OrderedDict((k, v) for k, v in resnet.named_children() if k not in dropped))
        last = getattr(resnet, f"layer{stages}")
        self.out_channels = [m for m in last.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self.trainable = trainable
        if not trainable:
            self.body.requires_grad_(False)
            self.body.eval()

    def train(self, mode: bool = True):
        # a frozen encoder keeps its BatchNorm statistics: always in eval mode
        return super().train(mode and self.trainable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.body(images)                    # (B, C, h, w)
        return grid.flatten(2).transpose(1, 2)      # (B, h*w, C)

    @torch.no_grad()
    def folded(self) -> Encoder:
        """A frozen eval-mode copy that gives the same features with every BatchNorm folded into the
        convolution it follows (weights scaled by gamma / sqrt(running_var + eps), a bias added).

        For running the ResNet many times, as feature extraction does: the BatchNorm passes over the
        activations are gone. The fold is computed in fp32 whatever this module's dtype, and the copy
        gets that dtype back. This module is left as it is, its state_dict keys included.
        """
        from torchvision.models.resnet import BasicBlock, Bottleneck

        if self.trainable:
            raise ValueError("only a frozen encoder can be folded: a trained one's BatchNorm statistics change")
        dtype = next(self.parameters()).dtype
        encoder = copy.deepcopy(self).float().eval()
        for module in list(encoder.body.modules()):
            if type(module) in (BasicBlock, Bottleneck):        # their forward runs bn{i}(conv{i}(x)), by name
                for i in (1, 2, 3):
                    if hasattr(module, f"bn{i}"):
                        conv, bn = getattr(module, f"conv{i}"), getattr(module, f"bn{i}")
                        setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                        setattr(module, f"bn{i}", nn.Identity())
            elif isinstance(module, nn.Sequential):             # the stem (conv1, bn1, ...) and each downsample
                for i in range(1, len(module)):
                    if isinstance(module[i], nn.BatchNorm2d) and isinstance(module[i - 1], nn.Conv2d):
                        module[i - 1], module[i] = fuse_conv_bn_eval(module[i - 1], module[i]), nn.Identity()
        left = [name for name, m in encoder.named_modules() if isinstance(m, nn.BatchNorm2d)]
        if left:
            raise NotImplementedError(f"BatchNorm layers not after a convolution, cannot fold: {left[:3]}")
        return encoder.to(dtype).requires_grad_(False)


class WeightsUnavailableError(EnvironmentProblem):
    """torchvision's ImageNet weights could not be downloaded (offline machine, proxy, ...)."""


def _resnet(backbone: str, pretrained: bool) -> nn.Module:
    """torchvision's ResNet, with its ImageNet weights when `pretrained` (downloaded once into torch's cache)."""
    import torchvision  # here, not at the top: captioning from an ONNX export never loads it

    if not pretrained:
        return torchvision.models.get_model(backbone, weights=None)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        return torchvision.models.get_model(backbone, weights=weights)
    except (OSError, ConnectionError) as e:               # urllib's URLError is an OSError
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(weights.url).path).name
        raise WeightsUnavailableError(
            f"could not download torchvision's ImageNet weights for {backbone} ({getattr(e, 'reason', e)}): "
            f"copy {weights.url} to {cached} (torchvision's cache), or train without them: "
            "--set model.pretrained=false") from None


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s encoding of `positions` (L,) -> (L, dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * freq[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)   # interleaved sin, cos


def grid_encoding(h: int, w: int, dim: int) -> torch.Tensor:
    """2-D position of each cell of an h x w grid, row-major -> (h*w, dim): half rows, half columns."""
    rows = sinusoid(torch.arange(h), dim // 2)                # (h, dim/2)
    cols = sinusoid(torch.arange(w), dim // 2)                # (w, dim/2)
    return torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1).reshape(h * w, dim)


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal position of each token along the token axis (dim 1)."""

    def __init__(self, d_model: int, max_tokens: int):
        super().__init__()
        self.register_buffer("pe", sinusoid(torch.arange(max_tokens), d_model), persistent=False)  # (max_tokens, D)

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
    """`reshape` inside an ONNX export: one Reshape node with a constant shape (0 keeps that size)."""

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
    return reshape(x, 0, 0, num_heads, -1).transpose(1, 2)            # (N, T, D) -> (N, H, T, hd)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    return reshape(y.transpose(1, 2), 0, 0, -1)                       # (N, H, T, hd) -> (N, T, D)


def in_proj(attn: nn.MultiheadAttention, part: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows `part` of the packed [q; k; v] input projection of `attn`."""
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[part]
    return attn.in_proj_weight[part], bias


def attention(attn: nn.MultiheadAttention, q, k, v, allowed: torch.Tensor | None = None) -> torch.Tensor:
    # (.., Tq, hd) x (.., Tk, hd) -> (.., Tq, hd), with the attention dropout of `attn` while training;
    # allowed (.., Tq, Tk) bool: True where a query may see a key (None: everywhere)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=attn.dropout if attn.training else 0.0,
                                          scale=1.0 / math.sqrt(attn.head_dim))     # its default, as a constant


def feed_forward(layer: nn.TransformerDecoderLayer, x: torch.Tensor) -> torch.Tensor:
    return layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))


def decoder_layer(layer: nn.TransformerDecoderLayer, x: torch.Tensor, self_attention, cross_attention) -> torch.Tensor:
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
    """The layer's self-attention block of x (N, T, D) -> (output (N, T, D), keys, values (N, H, T', hd)).

    `past`: the (keys, values) of the positions before x (the decoding cache), prepended to x's own;
    `allowed` (N, 1, T, T'): True where a query may see a key (None: every key, as one new word may).
    """
    attn = layer.self_attn
    # the whole parameter, not a slice of it: autocast caches the bf16 copy of a parameter, not of a view
    qkv, D = F.linear(x, attn.in_proj_weight, attn.in_proj_bias), attn.embed_dim    # (N, T, 3D)
    # slices at constant offsets (chunk() would be traced as a chain of shape nodes run at every step)
    q, k, v = (split_heads(qkv[..., i * D:(i + 1) * D], attn.num_heads) for i in range(3))  # (N, H, T, hd)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (N, H, T', hd)
    y = attention(attn, q, k, v, allowed)
    return layer.dropout1(attn.out_proj(merge_heads(y))), k, v


def cross_attention(layer: nn.TransformerDecoderLayer, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    weights: list | None = None):
    """The layer's cross-attention block: x (N, T, D) reads keys/values (M, H, L, hd) of M images.

    N = M * G: rows G*m .. G*m+G-1 of x read image m (G = 1 in training, whose keys are already
    picked per caption; G = the beams of one image when decoding). The G rows of one image are
    lined up on its query axis rather than copying its keys G times. With a `weights` list, the
    attention weights (N, H, T, L) are appended to it (computed as softmax(q k^T / sqrt(hd)) instead
    of by the fused kernel, which does not return them; no attention dropout).
    """
    attn = layer.multihead_attn
    T = int(x.size(1))      # int(): a constant where the export traces it (its step graph feeds one word a row)
    # slices bounded by embed_dim, not by x's shape: a constant where the ONNX export traces it, so the weights
    # stay initializers (folded once, quantizable) rather than sliced at every step
    q = F.linear(x, *in_proj(attn, slice(0, attn.embed_dim)))                          # (N, T, D)
    q = split_heads(q.reshape(k.shape[:1] + (-1, attn.embed_dim)), attn.num_heads)     # (M, H, G*T, hd)
    if weights is None:
        y = attention(attn, q, k, v)                                    # (M, H, G*T, hd)
    else:
        w = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.head_dim ** -0.5, dim=-1)   # (M, H, G*T, L)
        w = w.transpose(1, 2)                                                                 # (M, G*T, H, L)
        weights.append(reshape(w, -1, T, 0, 0).transpose(1, 2))                              # (N, H, T, L)
        y = w.transpose(1, 2).to(v.dtype) @ v
    return layer.dropout2(attn.out_proj(reshape(merge_heads(y), -1, T, 0)))                # (N, T, D)


def cross_keys_values(layer: nn.TransformerDecoderLayer, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's cross-attention keys and values of memory (B, L, D) -> two (B, H, L, hd)."""
    attn, D = layer.multihead_attn, layer.multihead_attn.embed_dim     # a constant when traced (cross_attention)
    if attn.in_proj_weight is None:
        raise NotImplementedError("the decoder reads packed q/k/v weights (kdim == vdim == d_model)")
    kv = F.linear(memory, *in_proj(attn, slice(D, 3 * D)))              # (B, L, 2D)
    k, v = kv.chunk(2, dim=-1)
    return split_heads(k, attn.num_heads), split_heads(v, attn.num_heads)


class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        self.encoder = Encoder(cfg.backbone, cfg.pretrained, cfg.train_backbone, cfg.backbone_stages)
        self.project = nn.Linear(self.encoder.out_channels, cfg.d_model)
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        # std d^-1/2, so that embed * sqrt(d) has unit scale like the positions and the image side; PyTorch's
        # N(0, 1) would make words 11x (d=128) to 23x (d=512) louder and drown out both
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
        positions = grid_encoding(h, w, self.cfg.d_model).to(features.device, self.project.weight.dtype)   # (L, D)
        x = self.project(features) + positions
        return self.transformer.encoder(self.dropout(x))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> memory (B, h*w, d_model)."""
        return self.memory(self.encoder(images))

    # -- word side
    def embed_tokens(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(N, T) ids -> (N, T, d_model), scaled embedding plus word position."""
        return self.dropout(self.positions(self.embed(tokens) * math.sqrt(self.cfg.d_model), offset))

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None,
               attention: list | None = None) -> torch.Tensor:
        """memory (B, L, D) and tokens (N, T) -> logits (N, T, V); caption n reads image image_index[n]
        (default: image n).

        nn.TransformerDecoder's layers, run as nn.TransformerDecoderLayer.forward runs them (both
        norm_first settings; a test holds the two to the same logits), but each layer projects the
        cross-attention keys and values from the B images once and lets their captions share them,
        instead of projecting memory copied to every caption: with 5 captions an image that was a
        sixth of a training step at the reference size. Self-attention masks the future and every <pad> key.
        With an `attention` list, each layer's cross-attention weights (N, H, T, L) are appended to it.
        """
        x = self.embed_tokens(tokens)                                      # (N, T, D)
        T = tokens.size(1)
        allowed = ~causal_mask(T, tokens.device) & (tokens != self.pad_id)[:, None, None, :]   # (N, 1, T, T)
        for layer in self.transformer.decoder.layers:
            k, v = cross_keys_values(layer, memory)                        # (B, H, L, hd)
            if image_index is not None:
                k, v = k.index_select(0, image_index), v.index_select(0, image_index)   # (N, H, L, hd)
            x = decoder_layer(layer, x, lambda y: self_attention(layer, y, allowed=allowed)[0],
                              lambda y: cross_attention(layer, y, k, v, attention))
        if self.transformer.decoder.norm is not None:
            x = self.transformer.decoder.norm(x)
        return self.head(x)

    def forward(self, tokens: torch.Tensor, image_index: torch.Tensor | None = None, *,
                images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (N, T, V) for `tokens` (N, T) = <bos> w1 ... wn <eos> <pad>...

        Exactly one of `images` (B, 3, H, W) or `features` (B, L, C), the frozen encoder's cached
        output; `image_index` (N,) maps captions to images (default: one caption each).
        """
        if (images is None) == (features is None):
            raise ValueError("CaptionModel takes images= or features=, exactly one of them")
        memory = self.memory(features if features is not None else self.encoder(images))  # (B, L, D)
        return self.decode(memory, tokens, image_index)


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int = 0) -> CaptionModel:
    return CaptionModel(cfg, vocab_size, pad_id)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
