"""The PyTorch side of captioning: `TorchEncoder`, images or features -> memory at a precision.

The `CaptionModel` itself is the search's engine (`init_cache`, `step`). `greedy_reference` keeps
the re-run-everything path that tests hold the cached decoder to (the decode benchmark times it).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..data.dataset import build_transform
from ..device import autocast, resolve_device, resolve_precision
from ..model.caption_model import CaptionModel
from .rules import Rules


class TorchEncoder:
    """A CaptionModel's image side: preprocessed images (B, 3, H, W) or cached grid features
    (B, L, C) -> memory (B, L, d_model), fp32; and the context its decoding steps run in.

    A model handed in is left as it is (dtype, training flag): the ResNet runs under autocast at
    reduced precision, the transformer in fp32. With `own_model=True` (a model built for captioning
    only) the model is prepared once instead, which is faster (`prepare_for_inference`): at bf16 or
    fp16 every part runs at that precision, and on a CPU its linear layers read their weights in the
    layout the one-row products of decoding read fastest.
    """

    def __init__(self, model: CaptionModel, image_size: int, device=None, precision: str = "auto",
                 own_model: bool = False):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.transform = build_transform(image_size)   # the preprocessing it was trained with
        self.model = model.to(self.device)
        self.image_dtype, self.encoder_precision = torch.float32, self.precision
        self.transformer_precision = "fp32"
        if own_model:
            prepare_for_inference(model, self.precision, self.device)
            if self.precision != "fp32":
                # the ResNet's weights are cast (autocast would re-cast them on every call); the
                # transformer's products run under autocast over weights cast once
                self.image_dtype = next(model.encoder.parameters()).dtype
                self.encoder_precision, self.transformer_precision = "fp32", self.precision

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode and no gradients for the duration; the model's training flag is put back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def inference(self):
        """What the transformer runs in (memory, every decoding step): `evaluating`, under autocast
        where its weights were cast."""
        with self.evaluating(), autocast(self.transformer_precision, self.device):
            yield

    def as_memory(self, x) -> torch.Tensor:
        """Memory as the engine reads it: a tensor on the model's device (numpy is converted)."""
        return torch.as_tensor(x, device=self.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> grid features (B, L, C), in encoder precision."""
        with self.evaluating(), autocast(self.encoder_precision, self.device):
            return self.model.encoder(x.to(self.device, self.image_dtype,
                                           memory_format=torch.channels_last))

    def memory(self, *, images: torch.Tensor | None = None,
               features: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) or cached grid features (B, L, C) -> memory
        (B, L, d_model), fp32."""
        if (images is None) == (features is None):
            raise ValueError("memory() takes images= or features=, exactly one of them")
        if features is None:
            features = self.features(images)
        with self.inference():
            return self.model.memory(features.to(self.device, torch.float32)).float()


def prepare_for_inference(model: CaptionModel, precision: str, device: torch.device) -> None:
    """Prepares a model that will only caption, in place, for `precision` on `device`.

    bf16/fp16: the ResNet's weights are cast (channels_last), and so are the weights of every linear
    layer of the transformer side (projection, encoder, decoder, output layer), which then run under
    autocast: their products at that precision, the layer norms, softmax, residual stream and logits
    in fp32. A decoding step reads all the decoder's weights for one word a row, so halving their
    bytes halves its time; at fp32 the transformer was 80% of a caption on a bf16 CPU, whose ResNet
    is 4.5 times faster in bf16 (docs/benchmarks.md).

    On a CPU, each linear layer's weight (out, in) is stored column-major (its transpose
    contiguous): x @ W.T then reads W.T row by row, the layout in which MKL's one-row product
    streams the weights at about twice the rate of the row-major one (22 against 11 GB/s in fp32
    on a 2-core EPYC).
    """
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is not None:
        model.encoder.to(half, memory_format=torch.channels_last)
    for module in [model.project, model.head, *model.transformer.modules()]:
        if isinstance(module, nn.Linear):
            weight, bias = module.weight, module.bias
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weight, bias = module.in_proj_weight, module.in_proj_bias
        else:
            continue
        if half is not None:
            weight.data = weight.data.to(half)
            if bias is not None:
                bias.data = bias.data.to(half)
        if device.type == "cpu":
            weight.data = weight.data.t().contiguous().t()


@torch.no_grad()
def greedy_reference(model: CaptionModel, memory: torch.Tensor, bos: int, eos: int,
                     max_words: int) -> list[list[int]]:
    """`greedy` the slow way: the training path (`model.decode`) over the whole prefix each step."""
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
