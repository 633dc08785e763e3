"""The high-level Captioner: checkpoint -> images -> encoder -> decoding -> text.

    captioner = Captioner.from_checkpoint("runs/shapes/best.pt")
    captioner("photo.jpg")                                   # -> "a dog runs on the grass"
    captioner.caption(["a.jpg", "https://...", pil_image], beam_size=3)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import Config
from .data import build_transform
from .decoding import beam_search, greedy
from .device import autocast, resolve_device, resolve_precision
from .images import ImageLimits, ImageLoadError, describe, open_image
from .model import CaptionModel
from .vocab import Vocabulary


@dataclass
class CaptionResult:
    input: str                  # a printable name of the input (path, URL, <bytes: n>, <PIL.Image ...>)
    caption: str | None = None
    error: str | None = None    # why this input got no caption

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"input": self.input, "caption": self.caption} if self.ok else {"input": self.input, "error": self.error}


class Captioner:
    """Captions images with a model: the one prediction path of `caption`, `evaluate` and validation CIDEr.

    A model handed in is left as it is (its dtype, its training flag): the encoder runs under
    autocast at reduced precision. With `own_model=True` (as `from_checkpoint` builds its own) the
    ResNet's weights are cast once instead, which is faster. The transformer runs in fp32 either way,
    so captions barely move with the precision.
    """

    def __init__(self, model: CaptionModel, vocab: Vocabulary, cfg: Config, device=None, precision: str = "auto",
                 limits: ImageLimits | None = None, own_model: bool = False):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.vocab, self.cfg, self.limits = vocab, cfg, limits
        # the preprocessing the checkpoint was trained with, rebuilt from its config
        self.transform = build_transform(cfg.data.image_size)
        self.model = model.to(self.device)
        self.image_dtype, self.encoder_precision = torch.float32, self.precision
        if own_model and self.precision != "fp32":
            # the ResNet is most of the work: cast its weights once (autocast would re-cast them on every
            # call) and use channels_last
            self.image_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            self.encoder_precision = "fp32"
            model.encoder.to(self.image_dtype, memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, precision: str | None = "auto",
                        limits: ImageLimits | None = None) -> Captioner:
        """`precision` None: the run's own train.precision."""
        model, vocab, cfg = load_checkpoint(path)
        if precision is None:   # fp16 is CUDA's: a run trained in it captions in the device's default elsewhere
            fp16_elsewhere = cfg.train.precision == "fp16" and resolve_device(device).type != "cuda"
            precision = "auto" if fp16_elsewhere else cfg.train.precision
        return cls(model.eval(), vocab, cfg, device, precision, limits, own_model=True)

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode and no gradients for the duration; the model's training flag is put back afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> grid features (B, L, C), in the encoder's precision."""
        with self._inference(), autocast(self.encoder_precision, self.device):
            return self.model.encoder(x.to(self.device, self.image_dtype, memory_format=torch.channels_last))

    def memory(self, *, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) or cached grid features (B, L, C) -> memory (B, L, d_model), fp32."""
        if (images is None) == (features is None):
            raise ValueError("memory() takes images= or features=, exactly one of them")
        if features is None:
            features = self.features(images)
        with self._inference():
            return self.model.memory(features.to(self.device, torch.float32))

    def encode(self, images, chunk: int = 8) -> torch.Tensor:
        """RGB PIL images -> transformer memory (B, L, d_model), in fp32.

        The ResNet sees `chunk` images at a time: its activations are most of the peak memory (at
        224 px, 32 images at once is about 0.5 GB more than 8), for the same images per second.
        """
        parts = []
        for start in range(0, len(images), chunk):
            x = torch.stack([self.transform(im) for im in images[start:start + chunk]])
            parts.append(self.memory(images=x))
        return torch.cat(parts)

    def decode(self, memory: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
               length_penalty: float = 1.0) -> list[str]:
        """Memory (B, L, d_model) -> B captions, greedy (beam_size=1) or by beam search."""
        max_words = max_words or self.cfg.data.max_words
        bos, eos = self.vocab.bos, self.vocab.eos
        with self._inference():
            if beam_size == 1:
                ids = greedy(self.model, memory, bos, eos, max_words)
            else:
                ids = [hyps[0][0] for hyps in beam_search(self.model, memory, bos, eos, max_words, beam_size,
                                                          length_penalty)]
        return [self.vocab.decode(i) for i in ids]

    def predict(self, *, images: torch.Tensor | None = None, features: torch.Tensor | None = None,
                beam_size: int = 1, max_words: int | None = None, length_penalty: float = 1.0) -> list[str]:
        """Captions of a batch already preprocessed (images) or encoded (cached features), in order."""
        return self.decode(self.memory(images=images, features=features), beam_size, max_words, length_penalty)

    def caption(self, inputs, beam_size: int = 1, batch_size: int = 16, max_words: int | None = None,
                length_penalty: float = 1.0) -> list[CaptionResult]:
        """One result per input, in order; a bad input gets an error and the others still get captions."""
        if isinstance(inputs, (str, Path, bytes)) or not hasattr(inputs, "__iter__"):
            inputs = [inputs]
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        inputs = list(inputs)
        results = [CaptionResult(describe(x)) for x in inputs]
        for start in range(0, len(inputs), batch_size):  # open a batch at a time: a folder never sits in memory
            images = {}
            for i in range(start, min(start + batch_size, len(inputs))):
                try:
                    images[i] = open_image(inputs[i], self.limits)
                except ImageLoadError as e:
                    results[i].error = str(e)
            if images:
                captions = self.decode(self.encode(list(images.values())), beam_size, max_words, length_penalty)
                for i, caption in zip(images, captions):
                    results[i].caption = caption
        return results

    def __call__(self, x, beam_size: int = 1) -> str:
        """The caption of one input; raises ImageLoadError when it cannot be read."""
        result = self.caption([x], beam_size=beam_size)[0]
        if not result.ok:
            raise ImageLoadError(result.error)
        return result.caption
