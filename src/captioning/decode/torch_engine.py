"""The PyTorch side of captioning: `TorchEncoder`, images or features -> memory at a precision.

The `CaptionModel` itself is the search's engine (`init_cache`, `step`). `greedy_reference` keeps
the re-run-everything path that tests hold the cached decoder to (the decode benchmark times it).
"""
from __future__ import annotations

import contextlib

import torch

from ..data.dataset import build_transform
from ..device import autocast, resolve_device, resolve_precision
from ..model.caption_model import CaptionModel
from .rules import Rules


class TorchEncoder:
    """A CaptionModel's image side: preprocessed images (B, 3, H, W) or cached grid features
    (B, L, C) -> memory (B, L, d_model), fp32.

    A model handed in is left as it is (dtype, training flag): the ResNet runs under autocast at
    reduced precision. With `own_model=True` (a model built for captioning only) its weights are
    cast once instead, which is faster. The transformer runs in fp32 either way.
    """

    def __init__(self, model: CaptionModel, image_size: int, device=None, precision: str = "auto",
                 own_model: bool = False):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.transform = build_transform(image_size)   # the preprocessing it was trained with
        self.model = model.to(self.device)
        self.image_dtype, self.encoder_precision = torch.float32, self.precision
        if own_model and self.precision != "fp32":
            # the ResNet is most of the work: cast its weights once (autocast re-casts them on
            # every call) and use channels_last
            self.image_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            self.encoder_precision = "fp32"
            model.encoder.to(self.image_dtype, memory_format=torch.channels_last)

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
