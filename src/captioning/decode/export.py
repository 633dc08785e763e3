"""Export a checkpoint for ONNX Runtime: three graphs and three JSON files in one folder, checked
before it is kept.

    encoder.onnx     CaptionModel.encode: images (B, 3, S, S), preprocessed -> memory (B, L, D)
                     (its weights in encoder.onnx.data)
    start.onnx       CaptionModel.init_cache: memory (M, L, D)
                     -> cross_k_i, cross_v_i (M, H, L, hd)
    step.onnx        CaptionModel.step: tokens (N,), position (), self_k_i, self_v_i (N, H, T, hd),
                     cross_k_i, cross_v_i (M, H, L, hd), N = M * group
                     -> logits (N, V), next_self_k_i, next_self_v_i (N, H, T+1, hd),
                        attention (layers, N, H, L): each layer's cross-attention weights
    vocab.json       the vocabulary, a list of tokens
    preprocess.json  the square bilinear resize and normalisation of data.build_transform
    config.json      format version, the resolved config, the quantization, the check's figures

for each decoder layer i. The graphs are traced from the very functions the PyTorch path runs
(`CaptionModel.encode`, `model.cross_keys_values`, `CaptionModel.decoder_hidden`), so the search
code in search.py drives either engine. `quantize="int8"` stores the weights of start.onnx's and
step.onnx's matrix products, the output layer's included, as 8-bit blocks (onnxruntime's
MatMulNBits), and step.onnx rescores the 16 best words of each step with the output layer's fp32
weights; it also quantizes encoder.onnx's ResNet statically, calibrated on images of the run's
training split, and packs its transformer encoder's weights in 8-bit blocks too (quantize.py),
unless `encoder="fp32"` (docs/design.md says why).

Everything is written into a hidden folder beside `out`, checked (the exported graphs must give the
PyTorch model's logits within a stated tolerance) and only then renamed to `out`: a failed or
interrupted export leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, EnvironmentProblem, to_dict
from ..data.dataset import IMAGENET_MEAN, IMAGENET_STD
from ..data.images import open_image
from ..model.caption_model import CaptionModel
from ..model.checkpoint import checkpoint_path, load_checkpoint
from ..model.kv_cache import DecoderCache
from ..model.layers import cross_keys_values
from .onnx_engine import EXPORT_FORMAT, OrtEngine, load_session, preprocess, require_onnx
from .quantize import calibration_images, pack_matmuls, quantize_encoder

log = logging.getLogger(__name__)
OPSET = 17
# the check: the largest |logit difference| over a few images and words, relative to the
# largest |logit|
TOLERANCE = {None: 1e-3, "int8": 0.1}
ENCODERS = ("int8", "fp32")    # int8: a statically quantized ResNet (quantize.py), with int8 only
INT8_BLOCK = 128   # int8: input rows per weight scale (docs/design.md says why not 32 or 64)
SHORTLIST = 16     # int8: the output layer's best words per step, rescored with its fp32 weights


class ExportCheckError(EnvironmentProblem):
    """The exported graphs do not give the checkpoint's logits (an exporter or runtime version that
    does not fit): nothing was written."""


class _Start(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor):
        kv = [cross_keys_values(layer, memory) for layer in self.model.transformer.decoder.layers]
        return tuple(k for k, _ in kv) + tuple(v for _, v in kv)


class _Step(nn.Module):
    """CaptionModel.step as a graph. With a `shortlist` k, the output layer's k best words of each
    row are rescored with its fp32 weights (a Gather of k rows, which the quantizer leaves alone):
    the int8 product only shortlists, and the logits a search picks from come from fp32 weights
    (the softmax's normaliser still sums the int8 logits of the others). The graph holds the output
    layer twice."""

    def __init__(self, model: CaptionModel, shortlist: int = 0):
        super().__init__()
        self.model, self.layers, self.shortlist = (model, len(model.transformer.decoder.layers),
                                                   shortlist)

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, *past: torch.Tensor):
        n = self.layers
        cache = DecoderCache(list(past[:n]), list(past[n:2 * n]), list(past[2 * n:3 * n]),
                             list(past[3 * n:]))
        # model.embed_tokens at a tensor position (a Python int would be traced as a constant)
        x = self.model.embed(tokens[:, None]) * math.sqrt(self.model.cfg.d_model) \
            + self.model.positions.pe.index_select(0, position.reshape(1))     # (N, 1, D)
        weights = []
        hidden = self.model.decoder_hidden(x, cache, weights)                 # (N, 1, D)
        head = self.model.head
        logits = head(hidden)[:, 0]                                           # (N, V)
        if self.shortlist:
            top = logits.topk(min(self.shortlist, head.out_features), dim=-1).indices  # (N, k)
            logits = logits.scatter(1, top, (head.weight[top] @ hidden.transpose(1, 2))[..., 0]
                                    + head.bias[top])
        return (logits, *cache.self_k, *cache.self_v, torch.stack(weights))


def cache_names(layers: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{kind}_{i}" for kind in ("self_k", "self_v") for i in range(layers)]


def to_onnx(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict) -> None:
    """torch.onnx.export's TorchScript exporter (the dynamo one needs onnxscript), with
    nn.TransformerEncoder's fused fast path, which has no ONNX form, off while tracing."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    module.eval()   # a new wrapper is in training mode (the exporter puts it and the model back)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            # the TorchScript exporter's deprecation and tracer warnings
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@torch.no_grad()
def export_graphs(model: CaptionModel, image_size: int, folder: Path, shortlist: int = 0) -> None:
    """encoder.onnx, start.onnx and step.onnx of `model` (fp32, eval mode) into `folder`;
    `shortlist`: _Step's."""
    n, cfg = len(model.transformer.decoder.layers), model.cfg
    images = torch.randn(2, 3, image_size, image_size)
    to_onnx(_Encode(model), (images,), folder / "encoder.onnx", ["images"], ["memory"],
            {"images": {0: "B"}, "memory": {0: "B"}})
    weights_beside(folder / "encoder.onnx")
    memory = model.encode(images)
    kv_names = [f"cross_{kind}_{i}" for kind in ("k", "v") for i in range(n)]
    to_onnx(_Start(model), (memory,), folder / "start.onnx", ["memory"], kv_names,
            {"memory": {0: "M"}, **{name: {0: "M"} for name in kv_names}})
    cache = model.init_cache(memory, group=2)
    model.step(cache, torch.tensor([1, 2, 3, 4]))       # one word in the cache: T = 1 when traced
    past = (*cache.self_k, *cache.self_v, *cache.cross_k, *cache.cross_v)
    inputs = ["tokens", "position", *cache_names(n), *kv_names]
    outputs = ["logits", *cache_names(n, "next_"), "attention"]
    axes = {"tokens": {0: "N"}, "logits": {0: "N"}, "attention": {1: "N"},
            **{name: {0: "N", 2: "T"} for name in cache_names(n)},
            **{name: {0: "N", 2: "T+1"} for name in cache_names(n, "next_")},
            **{name: {0: "M"} for name in kv_names}}
    to_onnx(_Step(model, shortlist), (torch.tensor([5, 6, 7, 8]), torch.tensor(1), *past),
            folder / "step.onnx", inputs, outputs, axes)
    log.info("exported d_model %d, %d decoder layers, %d words", cfg.d_model, n,
             model.head.out_features)


def weights_beside(path: Path, dst: Path | None = None) -> None:
    """The graph at `path` saved to `dst` (default: in place) with its weights in dst.data: ONNX
    Runtime maps them from there instead of holding the whole file in memory while it loads (a
    smaller peak RSS)."""
    import onnx

    dst = dst or path
    onnx.save_model(onnx.load(path), dst, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


class _Encode(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)


def quantize_int8(folder: Path) -> None:
    """start.onnx and step.onnx with 8-bit weights in their matrix products, the output layer's too
    (quantize.pack_matmuls, blocks of INT8_BLOCK rows); the word embedding (a Gather) stays fp32."""
    for name in ("start.onnx", "step.onnx"):
        # INT8_BLOCK read when called: benchmarks/export_agreement.py compares others
        if not pack_matmuls(folder / name, folder / name, INT8_BLOCK):
            raise ExportCheckError(f"{name}: the quantizer left no matrix product in 8 bits")


@torch.no_grad()
def check_export(model: CaptionModel, folder: Path, image_size: int, quantize: str | None = None,
                 words: int = 6, group: int = 2, images: torch.Tensor | None = None) -> dict:
    """The largest logit difference between the exported graphs and `model` on two images (default
    random ones; an int8 encoder is checked on two of its calibration images, whose range it
    knows), `group` rows an image, over `words` random words, relative to the largest |logit|;
    ExportCheckError above TOLERANCE."""
    generator = torch.Generator().manual_seed(0)
    if images is None:
        images = torch.randn(2, 3, image_size, image_size, generator=generator)
    engine = OrtEngine(load_session(folder / "start.onnx"), load_session(folder / "step.onnx"),
                       model.pad_id)
    memory = model.encode(images)
    onnx_memory = load_session(folder / "encoder.onnx").run(None, {"images": images.numpy()})[0]
    caches = model.init_cache(memory, group), engine.init_cache(onnx_memory, group)
    tokens = torch.randint(4, model.head.out_features, (words, 2 * group), generator=generator)
    worst, scale, worst_attention = 0.0, 0.0, 0.0
    for t in range(words):
        maps = [], []
        ours = model.step(caches[0], tokens[t], maps[0])
        theirs = torch.from_numpy(engine.step(caches[1], tokens[t].numpy(), maps[1]))
        # a logit pinned to -inf (a word ruled out by its bias) is the same -inf in both
        worst = max(worst, (ours - theirs).masked_fill(ours == theirs, 0).abs().max().item())
        scale = max(scale, ours[ours.isfinite()].abs().max().item())
        attention_diff = torch.stack(maps[0]) - torch.from_numpy(np.stack(maps[1]))
        worst_attention = max(worst_attention, attention_diff.abs().max().item())
    relative = worst / max(scale, 1e-6)
    report = {"max_abs_logit_diff": worst, "max_abs_logit": scale, "relative": relative,
              "max_abs_attention_diff": worst_attention, "tolerance": TOLERANCE[quantize],
              "words": words, "images": 2, "group": group}
    if not relative <= TOLERANCE[quantize]:
        raise ExportCheckError(f"the exported graphs' logits differ from the checkpoint's by up to "
                               f"{worst:.4g} ({relative:.3g} of the largest |logit| {scale:.4g}; "
                               f"tolerance {TOLERANCE[quantize]}): nothing was written")
    return report


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def export(checkpoint: str | Path, out: str | Path, quantize: str | None = None, *,
           encoder: str | None = None, calibration: str | Path | None = None) -> dict:
    """Export `checkpoint` into the new folder `out` (see the module's docstring); returns
    config.json's dict. With quantize="int8" the encoder is int8 too unless encoder="fp32",
    calibrated on a sample of the run's training images or of the folder `calibration`."""
    encoder = _encoder_choice(quantize, encoder, calibration)
    require_onnx("export", "onnx", "onnxruntime", *(["onnx_ir"] if quantize else []))
    out = _new_folder(out)
    path = checkpoint_path(checkpoint)
    model, vocab, cfg = load_checkpoint(path)
    model.float().eval()
    images = calibration_images(cfg, path, calibration) if encoder == "int8" else None
    return export_model(model, vocab, cfg, out, quantize, path, calibration=images)


def _encoder_choice(quantize: str | None, encoder: str | None, calibration) -> str:
    """The encoder's precision: int8 with --quantize int8 unless --encoder fp32; checked."""
    if quantize not in TOLERANCE:
        raise ValueError(f"--quantize {quantize}: expected int8 (or nothing, for fp32)")
    if encoder not in (None, *ENCODERS):
        raise ValueError(f"--encoder {encoder}: expected int8 or fp32")
    if encoder == "int8" and not quantize:
        raise ValueError("--encoder int8 goes with --quantize int8 (an fp32 export is fp32 "
                         "throughout)")
    chosen = encoder or ("int8" if quantize else "fp32")
    if calibration is not None and chosen != "int8":
        raise ValueError(f"--calibration {calibration}: only the int8 encoder is calibrated "
                         "(--quantize int8, without --encoder fp32)")
    return chosen


def _new_folder(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists: name a new folder (or remove this one)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    return out


def export_model(model: CaptionModel, vocab, cfg, out: str | Path, quantize: str | None,
                 source: str | Path, calibration: list[Path] | None = None) -> dict:
    """`export` of a model in memory (fp32, eval mode) into the new folder `out`; `source`: where
    it came from. With quantize="int8" and `calibration` images, the encoder is int8 too."""
    out = _new_folder(out)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        export_graphs(model, cfg.data.image_size, folder, SHORTLIST if quantize else 0)
        check = {"fp32": check_export(model, folder, cfg.data.image_size)}
        encoder = None
        if quantize:
            quantize_int8(folder)
            images = None
            if calibration:
                encoder = _quantize_encoder(folder, calibration, _preprocess(cfg))
                images = torch.from_numpy(np.stack(
                    [preprocess(open_image(p), **_preprocess(cfg)) for p in calibration[:2]]))
            check[quantize] = check_export(model, folder, cfg.data.image_size, quantize,
                                           images=images)
        meta = _metadata(cfg, vocab.to_list(), source, quantize, check, encoder)
        for name, obj in (("vocab.json", vocab.to_list()),
                          ("preprocess.json", meta.pop("preprocess")), ("config.json", meta)):
            _write_json(folder / name, obj)
        if out.exists():
            out.rmdir()                        # empty (checked above): rename needs it gone
        os.rename(folder, out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return meta


def _preprocess(cfg) -> dict:
    """preprocess.json's numbers, as onnx_engine.preprocess takes them."""
    return {"image_size": cfg.data.image_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD)}


def _quantize_encoder(folder: Path, calibration: list[Path], pre: dict) -> dict:
    """folder/encoder.onnx with its ResNet in int8 (quantize.py), its weights beside it again."""
    with tempfile.TemporaryDirectory(prefix=".encoder-", dir=folder) as tmp:
        quantized = Path(tmp) / "encoder.onnx"
        recipe = quantize_encoder(folder / "encoder.onnx", quantized, calibration, pre,
                                  INT8_BLOCK)
        (folder / "encoder.onnx.data").unlink()
        weights_beside(quantized, folder / "encoder.onnx")
    return recipe


def _metadata(cfg, tokens: list[str], checkpoint: Path, quantize: str | None, check: dict,
              encoder: dict | None = None) -> dict:
    """config.json; its int8 "encoder" is the int8 encoder's recipe, or "fp32"."""
    if len(tokens) != len(set(tokens)):
        raise ConfigError(f"{checkpoint}: its vocabulary repeats a token")
    return {"format_version": EXPORT_FORMAT, "config": to_dict(cfg), "checkpoint": str(checkpoint),
            "quantize": quantize, "opset": OPSET, "torch": torch.__version__, "check": check,
            "int8": {"weights": "MatMulNBits, 8 bits, symmetric", "block": INT8_BLOCK,
                     "shortlist": SHORTLIST, "encoder": encoder or "fp32"} if quantize else None,
            "preprocess": {**_preprocess(cfg), "resize": "bilinear, square (no crop)"}}
