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
    (B, L, C) -> memory (B, L, d_model), fp32.

    A model handed in is left as it is (dtype, training flag): the ResNet runs under autocast at
    reduced precision. With `own_model=True` (a model built for captioning only) the model is
    prepared once instead, which is faster (`prepare_for_inference`). The transformer runs in fp32
    either way.
    """

    def __init__(self, model: CaptionModel, image_size: int, device=None, precision: str = "auto",
                 own_model: bool = False):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.transform = build_transform(image_size)   # the preprocessing it was trained with
        self.model = model.to(self.device)
        self.image_dtype, self.encoder_precision = torch.float32, self.precision
        if own_model:
            prepare_for_inference(model, self.precision, self.device)
            if self.precision != "fp32":     # the ResNet's weights are cast: no autocast around it
                self.image_dtype = next(model.encoder.parameters()).dtype
                self.encoder_precision = "fp32"

    @contextlib.contextmanager
    def inference(self):
        """Eval mode and no gradients for the duration; the model's training flag is put back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def as_memory(self, x) -> torch.Tensor:
        """Memory as the engine reads it: a tensor on the model's device (numpy is converted)."""
        return torch.as_tensor(x, device=self.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> grid features (B, L, C), in encoder precision."""
        with self.inference(), autocast(self.encoder_precision, self.device):
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
            return self.model.memory(features.to(self.device, torch.float32))


def prepare_for_inference(model: CaptionModel, precision: str, device: torch.device) -> None:
    """Prepares a model that will only caption, in place, for `precision` on `device`.

    bf16/fp16: the ResNet's weights are cast once (autocast would cast them again at every call),
    channels_last. The transformer stays fp32: with its products in bf16 too (weights cast once,
    under autocast) its memory and 20 steps took 0.83 of the time on a bf16 CPU (180 against 218
    ms, one image), but the Shapes demo model's greedy captions then matched its fp32 ones on 95.7%
    of the test split, against 98.3% with the ResNet alone in bf16 (docs/benchmarks.md) -- below
    the 97% an int8 export must keep.

    On a CPU, each linear layer's weight (out, in) is stored column-major (its transpose
    contiguous): x @ W.T then reads W.T row by row, the layout in which MKL's one-row product
    streams the weights at about twice the rate of the row-major one (22 against 11 GB/s in fp32
    on a 2-core EPYC). A decoding step is one row a sequence through every decoder weight, bound by
    how fast they are read; the values do not change.
    """
    if precision in ("bf16", "fp16"):
        model.encoder.to(torch.bfloat16 if precision == "bf16" else torch.float16,
                         memory_format=torch.channels_last)
    if device.type != "cpu":
        return
    for module in [model.project, model.head, *model.transformer.modules()]:
        if isinstance(module, nn.Linear):
            weight = module.weight
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weight = module.in_proj_weight
        else:
            continue
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
