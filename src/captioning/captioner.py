"""The high-level Captioner: checkpoint -> images -> encoder -> decoding -> text.

    captioner = Captioner.from_checkpoint("runs/shapes/best.pt")
    captioner("photo.jpg")                                   # -> "a dog runs on the grass"
    captioner.caption(["a.jpg", "https://...", pil_image], beam_size=3)
    Captioner.from_export("exports/shapes")                  # the same, on ONNX Runtime (onnx_engine.py)

Importing this module does not import torch: a Captioner over a checkpoint imports it when it is made,
one over an export never does (design.md: about 500 MB of a process's RSS).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .config import Config
from .decoding import DecodeOptions, Hypothesis, array_ops, rules_for, search
from .images import ImageLimits, ImageLoadError, describe, open_image
from .vocab import Vocabulary

if TYPE_CHECKING:      # the checkpoint's path imports these when it runs; an export's never does
    import torch

    from .model import CaptionModel


@dataclass
class CaptionResult:
    input: str                  # a printable name of the input (path, URL, <bytes: n>, <PIL.Image ...>)
    caption: str | None = None  # the best caption
    error: str | None = None    # why this input got no caption
    captions: list[dict] = field(default_factory=list)   # num_captions > 1: [{caption, score, logprob}], best first
    words: list[str] | None = None             # attention=True: the best caption's words, then <eos> if it ended
    attention: np.ndarray | None = None        # attention=True: (len(words), h, w), one map per word, each sums to 1
    image: Image.Image | None = None           # attention=True: the image as the encoder saw it (resized)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """The JSON line of `caption --json` (maps left out: `caption --attention DIR` draws them)."""
        if not self.ok:
            return {"input": self.input, "error": self.error}
        out = {"input": self.input, "caption": self.caption}
        if len(self.captions) > 1:
            out["captions"] = self.captions
        if self.words is not None:
            out["words"] = self.words
        return out


class Captioner:
    """Captions images with a model: the one prediction path of `caption`, `evaluate` and validation CIDEr.

    A model handed in is left as it is (its dtype, its training flag): the encoder runs under
    autocast at reduced precision. With `own_model=True` (as `from_checkpoint` builds its own) the
    ResNet's weights are cast once instead, which is faster. The transformer runs in fp32 either way,
    so captions barely move with the precision.
    """

    def __init__(self, model: CaptionModel, vocab: Vocabulary, cfg: Config, device=None, precision: str = "auto",
                 limits: ImageLimits | None = None, own_model: bool = False):
        import torch

        from .data import build_transform
        from .device import resolve_device, resolve_precision

        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.vocab, self.cfg, self.limits = vocab, cfg, limits
        # the preprocessing the checkpoint was trained with, rebuilt from its config
        self.transform = build_transform(cfg.data.image_size)
        self.model = self.engine = model.to(self.device)        # the engine the search code calls: the model
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
        from .checkpoint import load_checkpoint

        model, vocab, cfg = load_checkpoint(path)
        if precision is None:   # fp16 is CUDA's: a run trained in it captions in the device's default elsewhere
            from .device import resolve_device

            fp16_elsewhere = cfg.train.precision == "fp16" and resolve_device(device).type != "cuda"
            precision = "auto" if fp16_elsewhere else cfg.train.precision
        return cls(model.eval(), vocab, cfg, device, precision, limits, own_model=True)

    @classmethod
    def from_export(cls, folder: str | Path, limits: ImageLimits | None = None, threads: int | None = None
                    ) -> Captioner:
        """A Captioner over the folder `python -m captioning export` wrote, on ONNX Runtime (CPU): the same
        options and results; `threads` None: ONNX Runtime's default, one a core."""
        from .onnx_engine import ExportCaptioner

        return ExportCaptioner(folder, limits, threads)

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode and no gradients for the duration; the model's training flag is put back afterwards."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> grid features (B, L, C), in the encoder's precision."""
        import torch

        from .device import autocast

        with self._inference(), autocast(self.encoder_precision, self.device):
            return self.model.encoder(x.to(self.device, self.image_dtype, memory_format=torch.channels_last))

    def memory(self, *, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) or cached grid features (B, L, C) -> memory (B, L, d_model), fp32."""
        if (images is None) == (features is None):
            raise ValueError("memory() takes images= or features=, exactly one of them")
        import torch

        if features is None:
            features = self.features(images)
        with self._inference():
            return self.model.memory(features.to(self.device, torch.float32))

    def encode(self, images, chunk: int = 8) -> torch.Tensor | np.ndarray:
        """RGB PIL images -> transformer memory (B, L, d_model), in fp32.

        The ResNet sees `chunk` images at a time: its activations are most of the peak memory (at
        224 px, 32 images at once is about 0.5 GB more than 8), for the same images per second.
        Tensors or numpy arrays, as `transform` and `memory` give them (an export's are numpy).
        """
        parts = []
        for start in range(0, len(images), chunk):
            x = [self.transform(im) for im in images[start:start + chunk]]
            parts.append(self.memory(images=array_ops(x[0]).stack(x)))
        return array_ops(parts[0]).concat(parts)

    def options(self, **options) -> DecodeOptions:
        """DecodeOptions from keyword arguments (unknown ones are a TypeError naming them), checked."""
        opts = DecodeOptions(**options)
        if opts.max_words is None:
            opts = replace(opts, max_words=self.cfg.data.max_words)
        if opts.max_words > self.cfg.model.max_tokens - 2:
            raise ValueError(f"max_words={opts.max_words}: this model reads at most model.max_tokens="
                             f"{self.cfg.model.max_tokens} tokens, <bos> and <eos> included: at most "
                             f"{self.cfg.model.max_tokens - 2} words")
        return opts.check(self.cfg.model.num_decoder_layers, self.cfg.model.num_heads)

    def generator(self, options: DecodeOptions) -> np.random.Generator | None:
        """Sampling's random numbers: one numpy generator a call, seeded with `seed` (else at random). Its
        uniforms pick the words (decoding.inverse_cdf), so a seed draws the same on either engine and device."""
        return np.random.default_rng(options.seed) if options.sampling else None

    def search(self, memory: torch.Tensor, options: DecodeOptions,
               generator: np.random.Generator | None = None) -> list[list[Hypothesis]]:
        """Memory (B, L, d_model) -> per image its hypotheses, best first."""
        v = self.vocab
        rules = rules_for(options, v.pad, v.bos, v.eos, v.index)
        generator = generator or self.generator(options)
        with self._inference():
            return search(self.engine, memory, options, rules, generator)

    def decode(self, memory: torch.Tensor, beam_size: int = 1, max_words: int | None = None,
               length_penalty: float = 1.0, **options) -> list[str]:
        """Memory (B, L, d_model) -> B captions (the best of each), greedy (beam_size=1) or by beam search."""
        opts = self.options(beam_size=beam_size, max_words=max_words, length_penalty=length_penalty, **options)
        return [self.vocab.decode(hyps[0].ids) for hyps in self.search(memory, opts)]

    def predict(self, *, images: torch.Tensor | None = None, features: torch.Tensor | None = None,
                **options) -> list[str]:
        """Captions of a batch already preprocessed (images) or encoded (cached features), in order."""
        return self.decode(self.memory(images=images, features=features), **options)

    def caption(self, inputs, beam_size: int = 1, batch_size: int = 16, **options) -> list[CaptionResult]:
        """One result per input, in order; a bad input gets an error and the others still get captions.

        Keyword options are DecodeOptions' (num_captions, temperature, top_k, top_p, seed,
        no_repeat_ngram_size, min_words, allow_function_word_end, attention, attention_layer,
        attention_head, max_words, length_penalty).
        """
        if isinstance(inputs, (str, Path, bytes)) or not hasattr(inputs, "__iter__"):
            inputs = [inputs]
        return list(self.caption_iter(list(inputs), beam_size=beam_size, batch_size=batch_size, **options))

    def caption_iter(self, inputs: list, beam_size: int = 1, batch_size: int = 16, workers: int = 4, **options):
        """`caption`'s results one by one, as each batch is done: for a folder of any size.

        `workers` threads open (read, download, decode) the next batch's images while the model
        captions this one; only two batches of images are ever in memory.
        """
        opts = self.options(beam_size=beam_size, **options)
        generator = self.generator(opts)     # one for the whole call: a caption does not depend on the batch it is in
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            for batch in self._opened_batches(inputs, batch_size, pool):
                results = [CaptionResult(describe(inputs[i])) for i, _ in batch]
                images = {k: image for k, (_, image) in enumerate(batch) if not isinstance(image, ImageLoadError)}
                for k, (_, image) in enumerate(batch):
                    if isinstance(image, ImageLoadError):
                        results[k].error = str(image)
                if images:
                    memory = self.encode(list(images.values()))
                    for k, hyps in zip(images, self.search(memory, opts, generator)):
                        self._fill(results[k], hyps, opts, memory.shape[1])
                        if opts.attention:
                            results[k].image = images[k].resize((self.cfg.data.image_size,) * 2, Image.BILINEAR)
                yield from results

    def _opened_batches(self, inputs: list, batch_size: int, pool: ThreadPoolExecutor):
        """Batches of (index, PIL image or the ImageLoadError), the next one opening while this one is used."""
        def submit(start: int) -> list:
            return [(i, pool.submit(self._open, inputs[i])) for i in range(start, min(start + batch_size, len(inputs)))]

        ahead = submit(0)
        for start in range(0, len(inputs), batch_size):
            current, ahead = ahead, submit(start + batch_size)
            yield [(i, future.result()) for i, future in current]

    def _open(self, source) -> Image.Image | ImageLoadError:
        try:
            return open_image(source, self.limits)
        except ImageLoadError as e:
            return e

    def _fill(self, result: CaptionResult, hyps: list[Hypothesis], options: DecodeOptions, cells: int) -> None:
        best = hyps[0]
        result.caption = self.vocab.decode(best.ids)
        result.captions = [{"caption": self.vocab.decode(h.ids), "score": round(h.score, 6),
                            "logprob": round(h.logprob, 6)} for h in hyps]
        if options.attention:
            side = math.isqrt(cells)
            h, w = (side, side) if side * side == cells else (1, cells)     # the grid, as CaptionModel.memory has it
            tokens = self.vocab.to_list()
            result.words = [tokens[i] for i in best.ids] + (["<eos>"] if len(best.maps) > len(best.ids) else [])
            maps = best.maps if isinstance(best.maps, np.ndarray) else best.maps.cpu().numpy()
            result.attention = maps.reshape(len(maps), h, w)

    def __call__(self, x, beam_size: int = 1) -> str:
        """The caption of one input; raises ImageLoadError when it cannot be read."""
        result = self.caption([x], beam_size=beam_size)[0]
        if not result.ok:
            raise ImageLoadError(result.error)
        return result.caption


class ResultsFile:
    """`caption --out FILE`: results appended as JSON Lines (`--json`'s objects) or CSV (input,caption,error),
    by extension, a whole line at a time; the inputs already in it are skipped by a run that goes on."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"--out {self.path}: expected a .jsonl or .csv file")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--out {self.path}: folder {self.path.parent} does not exist")
        self.csv = self.path.suffix.lower() == ".csv"
        self._drop_partial_line()
        self.done = self._read_done()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file) if self.csv else None
        if new and self.csv:
            self.writer.writerow(["input", "caption", "error"])

    def _drop_partial_line(self) -> None:
        """A run killed mid-write leaves at most a partial last line: cut it, so the file reads whole."""
        if self.path.is_file() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                self.path.write_bytes(data[:data.rfind(b"\n") + 1])

    def _read_done(self) -> set[str]:
        """The inputs whose last line holds a caption: those that failed are tried again."""
        if not self.path.is_file():
            return set()
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f) if self.csv else (json.loads(line) for line in f if line.strip())
            last = {row["input"]: bool(row.get("caption")) for row in rows if row.get("input")}
        return {name for name, captioned in last.items() if captioned}

    def write(self, result: CaptionResult, source: str | None = None) -> None:
        """One result; `source`: the input as given (result.input may be shortened for display)."""
        name = source if source is not None else result.input
        if self.csv:
            self.writer.writerow([name, result.caption or "", result.error or ""])
        else:
            self.file.write(json.dumps({**result.to_dict(), "input": name}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
