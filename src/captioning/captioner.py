"""The high-level Captioner: checkpoint -> images -> encoder -> decoding -> text.

    captioner = Captioner.from_checkpoint("runs/shapes/best.pt")
    captioner("photo.jpg")                                   # -> "a dog runs on the grass"
    captioner.caption(["a.jpg", "https://...", pil_image], beam_size=3)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import Config
from .data import build_transform
from .decoding import beam_search, greedy
from .device import resolve_device, resolve_precision
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
    def __init__(self, model: CaptionModel, vocab: Vocabulary, cfg: Config, device=None, precision: str = "auto",
                 limits: ImageLimits | None = None):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.vocab, self.cfg, self.limits = vocab, cfg, limits
        # the preprocessing the checkpoint was trained with, rebuilt from its config
        self.transform = build_transform(cfg.data.image_size)
        self.model = model.to(self.device).eval()
        self.image_dtype = torch.float32
        if self.precision != "fp32":
            # the ResNet is most of the work: cast its weights once (autocast would re-cast them on every
            # call) and use channels_last; the transformer stays in fp32, so captions barely move
            self.image_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            self.model.encoder.to(self.image_dtype, memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, precision: str = "auto",
                        limits: ImageLimits | None = None) -> "Captioner":
        model, vocab, cfg = load_checkpoint(path)
        return cls(model, vocab, cfg, device, precision, limits)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> grid features (B, L, C), in the encoder's precision."""
        return self.model.encoder(x.to(self.device, self.image_dtype, memory_format=torch.channels_last))

    @torch.no_grad()
    def encode(self, images, chunk: int = 8) -> torch.Tensor:
        """RGB PIL images -> transformer memory (B, L, d_model), in fp32.

        The ResNet sees `chunk` images at a time: its activations are most of the peak memory (at
        224 px, 32 images at once is about 0.5 GB more than 8), for the same images per second.
        """
        parts = []
        for start in range(0, len(images), chunk):
            x = torch.stack([self.transform(im) for im in images[start:start + chunk]])
            parts.append(self.model.memory(self.features(x).float()))
        return torch.cat(parts)

    @torch.no_grad()
    def decode(self, memory: torch.Tensor, beam_size: int = 1, max_len: int | None = None,
               length_penalty: float = 1.0) -> list[str]:
        """Memory (B, L, d_model) -> B captions, greedy (beam_size=1) or by beam search."""
        max_len = max_len or self.cfg.data.max_len
        bos, eos = self.vocab.bos, self.vocab.eos
        if beam_size == 1:
            ids = greedy(self.model, memory, bos, eos, max_len)
        else:
            ids = [hyps[0][0] for hyps in beam_search(self.model, memory, bos, eos, max_len, beam_size, length_penalty)]
        return [self.vocab.decode(i) for i in ids]

    @torch.no_grad()
    def caption(self, inputs, beam_size: int = 1, batch_size: int = 16, max_len: int | None = None,
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
                captions = self.decode(self.encode(list(images.values())), beam_size, max_len, length_penalty)
                for i, caption in zip(images, captions):
                    results[i].caption = caption
        return results

    def __call__(self, x, beam_size: int = 1) -> str:
        """The caption of one input; raises ImageLoadError when it cannot be read."""
        result = self.caption([x], beam_size=beam_size)[0]
        if not result.ok:
            raise ImageLoadError(result.error)
        return result.caption
