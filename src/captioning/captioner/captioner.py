"""The high-level Captioner: checkpoint -> images -> encoder -> decoding -> text.

    captioner = Captioner.from_checkpoint("runs/shapes/best.pt")
    captioner("photo.jpg")                          # -> "a dog runs on the grass"
    captioner.caption(["a.jpg", "https://...", pil_image], beam_size=3)
    Captioner.from_export("exports/shapes")         # the same, on ONNX Runtime (onnx_engine.py)

Importing this module does not import torch: a Captioner over a checkpoint imports it when it is
made, one over an export never does (design.md).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import Config, EnvironmentProblem
from ..data.images import ImageLimits, ImageLoadError, describe, open_image
from ..data.vocab import Vocabulary
from ..decode.arrays import Array, array_ops
from ..decode.rules import DecodeOptions, rules_for
from ..decode.search import Hypothesis, search


@dataclass
class CaptionResult:
    input: str                  # a printable name (path, URL, <bytes: n>, <PIL.Image ...>)
    caption: str | None = None  # the best caption
    error: str | None = None    # why this input got no caption
    captions: list[dict] = field(default_factory=list)  # [{caption, score, logprob}], best first
    # attention=True: the best caption's words (then <eos> if it ended), a (len(words), h, w) map
    # per word, each summing to 1, and the image as the encoder saw it (resized)
    words: list[str] | None = None
    attention: np.ndarray | None = None
    image: Image.Image | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """The JSON line of `caption --json` (no maps: `caption --attention DIR` draws them)."""
        if not self.ok:
            return {"input": self.input, "error": self.error}
        out = {"input": self.input, "caption": self.caption}
        if len(self.captions) > 1:
            out["captions"] = self.captions
        if self.words is not None:
            out["words"] = self.words
        return out


class Captioner:
    """Captions images: preprocessing -> encoder -> memory -> the search through an engine -> text.
    The one prediction path of `caption`, `evaluate` and validation CIDEr.

    `model` is the engine the search steps through: a CaptionModel, whose own image side is then
    the encoder (PyTorch on `device` at `precision`, see decode.torch_engine.TorchEncoder;
    `own_model=True` lets it cast the ResNet's weights), or another engine with its `encoder`
    (see `from_export`).
    """

    def __init__(self, model, vocab: Vocabulary, cfg: Config, device=None, precision: str = "auto",
                 limits: ImageLimits | None = None, own_model: bool = False, *, encoder=None):
        if encoder is None:
            from ..decode.torch_engine import TorchEncoder  # a CaptionModel: torch is imported

            encoder = TorchEncoder(model, cfg.data.image_size, device, precision, own_model)
        self.encoder, self.engine = encoder, model
        self.vocab, self.cfg, self.limits = vocab, cfg, limits

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, precision: str | None = "auto",
                        limits: ImageLimits | None = None, *, engine: str = "auto",
                        cache_dir: str | Path | None = None) -> Captioner:
        """`precision` None: the run's own train.precision. `engine` auto: ONNX Runtime on a CPU
        with the [export] extra, through an fp32 export cached by the checkpoint's hash (in
        `cache_dir`, default beside it), else PyTorch; torch or onnx: that one (engines.py)."""
        from .engines import cached_export, choose_engine

        if choose_engine(engine, device, precision) == "onnx":
            folder = cached_export(path, cache_dir)
            if folder is not None:
                return cls.from_export(folder, limits)
            if engine == "onnx":
                raise EnvironmentProblem(f"--engine onnx: {path} could not be exported (the "
                                         "line above says why); --engine torch runs it")
        from ..device import resolve_device
        from ..model.checkpoint import load_checkpoint

        model, vocab, cfg = load_checkpoint(path)
        if precision is None:   # fp16 is CUDA-only: elsewhere such a run gets the device's default
            fp16_elsewhere = cfg.train.precision == "fp16" and resolve_device(device).type != "cuda"
            precision = "auto" if fp16_elsewhere else cfg.train.precision
        return cls(model.eval(), vocab, cfg, device, precision, limits, own_model=True)

    @classmethod
    def from_export(cls, folder: str | Path, limits: ImageLimits | None = None,
                    threads: int | None = None) -> Captioner:
        """A Captioner over the folder `python -m captioning export` wrote, on ONNX Runtime (CPU):
        the same options and results; `threads` None: ONNX Runtime's default, one a core."""
        from ..decode.onnx_engine import load_export

        encoder, engine, export = load_export(folder, threads)
        captioner = cls(engine, export["vocab"], export["config"], limits=limits, encoder=encoder)
        captioner.export = export
        return captioner

    device = property(lambda self: self.encoder.device)
    precision = property(lambda self: self.encoder.precision)
    transform = property(lambda self: self.encoder.transform)  # PIL -> (3, S, S), tensor or array
    model = property(lambda self: getattr(self.encoder, "model", None))  # None for an export

    def features(self, x):
        """Preprocessed images (B, 3, H, W) -> grid features (B, L, C), in encoder precision."""
        if not hasattr(self.encoder, "features"):
            raise NotImplementedError("an export maps images to memory in one graph: its grid "
                                      "features are not exposed; "
                                      "use Captioner.from_checkpoint for features")
        return self.encoder.features(x)

    def memory(self, *, images=None, features=None):
        """Preprocessed images (B, 3, H, W) or cached grid features (B, L, C)
        -> memory (B, L, d_model), fp32."""
        return self.encoder.memory(images=images, features=features)

    def encode(self, images, chunk: int = 8) -> Array:
        """RGB PIL images -> transformer memory (B, L, d_model), in fp32.

        The ResNet sees `chunk` images at a time: its activations are most of the peak memory, and
        larger chunks are no faster. Tensors or numpy arrays, as `transform` and `memory` give them.
        """
        parts = []
        for start in range(0, len(images), chunk):
            x = [self.transform(im) for im in images[start:start + chunk]]
            parts.append(self.memory(images=array_ops(x[0]).stack(x)))
        return array_ops(parts[0]).concat(parts)

    def options(self, **options) -> DecodeOptions:
        """Checked DecodeOptions from keyword arguments (an unknown one: a TypeError naming it)."""
        opts = DecodeOptions(**options)
        if opts.max_words is None:
            opts = replace(opts, max_words=self.cfg.data.max_words)
        if opts.max_words > self.cfg.model.max_tokens - 2:
            raise ValueError(f"max_words={opts.max_words}: this model reads at most "
                             f"model.max_tokens={self.cfg.model.max_tokens} tokens, "
                             f"<bos> and <eos> included: at most "
                             f"{self.cfg.model.max_tokens - 2} words")
        return opts.check(self.cfg.model.num_decoder_layers, self.cfg.model.num_heads)

    def generator(self, options: DecodeOptions) -> np.random.Generator | None:
        """Sampling's random numbers: one numpy generator a call, seeded with `seed` (else random).
        Its uniforms pick the words (decoding.inverse_cdf), so a seed draws the same on any engine
        and device."""
        return np.random.default_rng(options.seed) if options.sampling else None

    def search(self, memory: Array, options: DecodeOptions,
               generator: np.random.Generator | None = None) -> list[list[Hypothesis]]:
        """Memory (B, L, d_model), a tensor or an array, -> per image its hypotheses, best first."""
        v = self.vocab
        memory = self.encoder.as_memory(memory)     # the engine's kind of array
        rules = rules_for(options, v.pad, v.bos, v.eos, v.index)
        generator = generator or self.generator(options)
        with self.encoder.inference():
            return search(self.engine, memory, options, rules, generator)

    def decode(self, memory: Array, beam_size: int = 1, max_words: int | None = None,
               length_penalty: float = 1.0, **options) -> list[str]:
        """Memory (B, L, d_model) -> B captions (the best of each), greedy (beam_size=1) or beam."""
        opts = self.options(beam_size=beam_size, max_words=max_words, length_penalty=length_penalty,
                            **options)
        return [self.vocab.decode(hyps[0].ids) for hyps in self.search(memory, opts)]

    def predict(self, *, images: Array | None = None, features: Array | None = None,
                **options) -> list[str]:
        """Captions of a batch, preprocessed (images) or encoded (cached features), in order."""
        return self.decode(self.memory(images=images, features=features), **options)

    def caption(self, inputs, beam_size: int = 1, batch_size: int = 16,
                **options) -> list[CaptionResult]:
        """One result per input, in order; a bad input gets an error, the others still captions.

        Keyword options are DecodeOptions' (num_captions, temperature, top_k, top_p, seed,
        no_repeat_ngram_size, min_words, allow_function_word_end, attention, attention_layer,
        attention_head, max_words, length_penalty).
        """
        if isinstance(inputs, (str, Path, bytes)) or not hasattr(inputs, "__iter__"):
            inputs = [inputs]
        return list(self.caption_iter(list(inputs), beam_size=beam_size, batch_size=batch_size,
                                      **options))

    def caption_iter(self, inputs: list, beam_size: int = 1, batch_size: int = 16, workers: int = 4,
                     **options):
        """`caption`'s results one by one, as each batch is done: for a folder of any size.

        `workers` threads open (read, download, decode) the next batch's images while the model
        captions this one; only two batches of images are ever in memory.
        """
        opts = self.options(beam_size=beam_size, **options)
        generator = self.generator(opts)  # one per call: a caption does not depend on its batch
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            for batch in self._opened_batches(inputs, batch_size, pool):
                results = [CaptionResult(describe(inputs[i])) for i, _ in batch]
                images = {k: image for k, (_, image) in enumerate(batch)
                          if not isinstance(image, ImageLoadError)}
                for k, (_, image) in enumerate(batch):
                    if isinstance(image, ImageLoadError):
                        results[k].error = str(image)
                if images:
                    memory = self.encode(list(images.values()))
                    for k, hyps in zip(images, self.search(memory, opts, generator)):
                        self._fill(results[k], hyps, opts, memory.shape[1])
                        if opts.attention:
                            results[k].image = images[k]     # _open made it the input size
                yield from results

    def _opened_batches(self, inputs: list, batch_size: int, pool: ThreadPoolExecutor):
        """Batches of (index, PIL image or ImageLoadError); the next opens while this is used."""
        def submit(start: int) -> list:
            return [(i, pool.submit(self._open, inputs[i]))
                    for i in range(start, min(start + batch_size, len(inputs)))]

        ahead = submit(0)
        for start in range(0, len(inputs), batch_size):
            current, ahead = ahead, submit(start + batch_size)
            yield [(i, future.result()) for i, future in current]

    def _open(self, source) -> Image.Image | ImageLoadError:
        """The image at the model's input size (the preprocessing's own square bilinear resize, done
        now): memory follows the batch, not the size of the source images."""
        try:
            image = open_image(source, self.limits)
        except ImageLoadError as e:
            return e
        size = (self.cfg.data.image_size,) * 2
        return image if image.size == size else image.resize(size, Image.BILINEAR)

    def _fill(self, result: CaptionResult, hyps: list[Hypothesis], options: DecodeOptions,
              cells: int) -> None:
        best = hyps[0]
        result.caption = self.vocab.decode(best.ids)
        result.captions = [{"caption": self.vocab.decode(h.ids), "score": round(h.score, 6),
                            "logprob": round(h.logprob, 6)} for h in hyps]
        if options.attention:
            side = math.isqrt(cells)
            h, w = (side, side) if side * side == cells else (1, cells)  # as CaptionModel.memory
            tokens = self.vocab.to_list()
            result.words = ([tokens[i] for i in best.ids]
                            + (["<eos>"] if len(best.maps) > len(best.ids) else []))
            maps = best.maps if isinstance(best.maps, np.ndarray) else best.maps.cpu().numpy()
            result.attention = maps.reshape(len(maps), h, w)

    def __call__(self, x, beam_size: int = 1) -> str:
        """The caption of one input; raises ImageLoadError when it cannot be read."""
        result = self.caption([x], beam_size=beam_size)[0]
        if not result.ok:
            raise ImageLoadError(result.error)
        return result.caption

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device=None, precision: str = "auto",
                        limits: ImageLimits | None = None, *, engine: str = "auto",
                        revision: str | None = None, threads: int | None = None) -> Captioner:
        """A model folder (`save`'s: model.safetensors, config.json, vocab.json), a hub id
        `user/name` (its snapshot, pip install -e '.[hub]'; `revision`: a branch, tag or commit)
        or an export folder. `engine` as from_checkpoint's: auto runs the folder's onnx/fp32 export
        on ONNX Runtime where it would (folder.pick_pretrained), else PyTorch; `threads`: an
        export's, as from_export's."""
        from .folder import load_model_folder, pick_pretrained

        kind, folder = pick_pretrained(path_or_id, engine, device, precision, revision)
        if kind == "export":
            return cls.from_export(folder, limits, threads)
        model, vocab, cfg, _ = load_model_folder(folder)
        return cls(model, vocab, cfg, device, precision, limits, own_model=True)

    def save_pretrained(self, folder: str | Path, *, checkpoint: str | Path | None = None,
                        report: str | Path | None = None, with_export=()) -> Path:
        """Write this captioner's model as a model folder (folder.py), its weights fp32: make it
        with precision="fp32" (and engine="torch"). `checkpoint`: where the weights come from, for
        the card (its run directory's env.json, history, splits and `evaluate` report)."""
        from .folder import checkpoint_facts, write_model_folder

        if self.model is None:
            raise ValueError("this Captioner runs an ONNX export, which holds no PyTorch weights: "
                             "make it with engine='torch', precision='fp32' to save it")
        source, facts = checkpoint_facts(checkpoint, report)[1:] if checkpoint else ({}, {})
        return write_model_folder(self.model, self.vocab, self.cfg, folder, source=source,
                                  with_export=with_export, card_facts=facts)
