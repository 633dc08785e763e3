"""Frozen-encoder feature cache: each image's ResNet grid features, computed once, stored as fp16.

With `model.train_backbone: false` the ResNet never changes, so running it on
every training step recomputes the same numbers epoch after epoch; it is also
most of the step's cost. `extract_features` runs it once per image, in
batches, and writes the grid features into one raw memory-mapped file that
training then reads instead:

    <root>/<key>/features.f16     raw float16, shape (N, L, C), row i = names[i]
    <root>/<key>/meta.json        key, names, shape, dtype and what went into the key
    <root>/<key>/progress.json    {"done": rows written}: an interrupted run resumes there

Sizes: Flickr30k's 31,783 images at 7x7x2048 (ResNet-152, 224 px) take
31,783 * 49 * 2048 * 2 bytes = 6.4 GB; the page cache serves what fits in memory.

What a cache is on disk, its key and how training reads it: feature_cache.py.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import Config
from ..data.dataset import build_transform
from ..data.images import open_image
from ..device import autocast, resolve_device, resolve_precision
from ..model.backbone import Encoder
from .feature_cache import (
    FEATURES_FILE,
    META_FILE,
    PROGRESS_FILE,
    FeatureCache,
    build_encoder,
    digest,
    encoder_fingerprint,
    key_parts,
    write_json_atomic,
)

log = logging.getLogger(__name__)
ENGINES = ("auto", "torch", "onnxruntime")
# engine "auto" times both engines only for this many images or more (the export takes ~5 s)
PROBE_MIN_IMAGES = 512
# ONNX Runtime's vs PyTorch's fp32 features, relative to the largest: a wrong export is off by ~1,
# while two convolution algorithms already differ by ~2e-3 on a deep random ResNet
EXPORT_TOLERANCE = 1e-2

# ---------------------------------------------------------------- writing

class _Images(Dataset):
    """Preprocessed images only, for extraction."""

    def __init__(self, images_dir: Path, names: list[str], image_size: int):
        self.images_dir, self.names, self.transform = images_dir, names, build_transform(image_size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_image(self.images_dir / self.names[i]))


def _partial_cache(folder: Path, key: str, names: list[str]) -> FeatureCache | None:
    """The cache already in `folder` if it is this key's and its file has its full size, else
    None."""
    try:
        cache = FeatureCache.open(folder)
    except (FileNotFoundError, ValueError, KeyError):
        return None
    n, L, C = cache.shape
    path = folder / FEATURES_FILE
    if (cache.key != key or cache.names != names or not path.is_file()
            or path.stat().st_size != n * L * C * 2):
        return None
    return cache


def extract_features(cfg: Config, names: list[str], images_dir: str | Path, root: str | Path,
                     encoder: nn.Module | None = None, batch_size: int = 64, device=None,
                     precision: str = "auto", progress: bool = True,
                     engine: str = "auto") -> FeatureCache:
    """Cache the grid features of `names` (in `images_dir`) under `root`/<key>; the complete cache.

    A partial cache (a killed process) goes on from its recorded count. `encoder` defaults to
    `build_encoder(cfg)`; one given must have the weights cfg describes and is not changed;
    `device` defaults to where it lives. The loader has its own generator: the global RNG draws
    alike, cache built or not. `engine` (see Extractor): "auto" runs the faster of PyTorch and
    ONNX Runtime, timed on the first batch; else the one named. meta.json says which ran, and why.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
    if cfg.model.train_backbone:
        raise ValueError("config key 'model.train_backbone': "
                         "features can only be cached for a frozen encoder")
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError("the image list for the feature cache "
                         + ("is empty" if not names else "holds duplicates"))
    images_dir = Path(images_dir).expanduser()
    parts = key_parts(cfg, names, images_dir)
    key = digest(parts)
    folder = Path(root).expanduser() / key
    cache = _partial_cache(folder, key, names)
    if cache is not None and cache.complete and encoder is None:
        return cache
    built = encoder is None
    encoder, device = _encoder_on_device(cfg, encoder, device)
    fingerprint = encoder_fingerprint(encoder)
    if cache is not None and cache.meta["encoder_sha256"] != fingerprint:
        raise ValueError(f"{folder}: cached with other encoder weights than these: "
                         "with model.pretrained=false, build the model right after "
                         "torch.manual_seed(cfg.seed), as build_encoder does, "
                         "or delete the folder")
    if cache is not None and cache.complete:
        return cache
    done = cache.done if cache is not None else 0
    extractor = Extractor(encoder, device, resolve_precision(precision, device),
                           _resumed(engine, cache, device), len(names) - done,
                           cfg.data.image_size, folder.parent)
    if built:
        del encoder                    # the folded copies are all that run
    writer = _CacheWriter(folder, names, cache,
                          meta=lambda shape: _meta(key, names, shape, parts, fingerprint,
                                                   extractor.choice, device))
    loader = DataLoader(_Images(images_dir, names[done:], cfg.data.image_size), batch_size,
                        num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())
    bar = tqdm(total=len(names), initial=done, desc="features", unit="img", disable=not progress)
    try:
        for images in loader:
            writer.append(extractor(images))                                    # (B, L, C)
            bar.update(len(images))
    finally:
        bar.close()
        writer.close()
        extractor.close()
    return FeatureCache.open(folder)


def _resumed(engine: str, cache: FeatureCache | None, device: torch.device) -> str:
    """auto, going on with a partial cache: the engine that began it (meta.json's), so that one
    cache is one engine's where it can be (ONNX Runtime's needs the CPU and the extra; else PyTorch
    goes on)."""
    began = (cache.meta.get("engine", {}).get("engine") if cache is not None and engine == "auto"
             else None)
    if began == "onnxruntime" and (device.type != "cpu" or _missing_onnx()):
        return "torch"
    return began if began in ("torch", "onnxruntime") else engine


def _encoder_on_device(cfg: Config, encoder: nn.Module | None,
                       device) -> tuple[nn.Module, torch.device]:
    """The encoder given and `device` (default: where it lives), or build_encoder(cfg) on `device`
    (default train.device)."""
    if encoder is None:
        device = resolve_device(cfg.train.device if device is None else str(device))
        return build_encoder(cfg).to(device), device
    return encoder, (torch.device(device) if device is not None
                     else next(encoder.parameters()).device)


def _extraction_net(encoder: nn.Module, device: torch.device,
                    precision: str) -> tuple[nn.Module, torch.dtype, str]:
    """(the module to run, the dtype to feed it, the autocast precision to run it under).

    An `Encoder` runs as its `folded()` copy (BatchNorm folded into the convolutions), cast once
    to reduced precision, as the Captioner does, rather than autocast re-casting its weights every
    batch; any other module runs as it is, reduced precision by autocast.
    """
    if not isinstance(encoder, Encoder):
        return encoder, torch.float32, precision
    net = encoder.folded()
    image_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return net.to(device, image_dtype, memory_format=torch.channels_last), image_dtype, "fp32"


class Extractor:
    """Images (B, 3, S, S) -> features (B, L, C), fp32 numpy, on the engine `choice` names.

    "torch": the folded encoder at `precision` (_extraction_net). "onnxruntime": the folded encoder
    exported to ONNX in fp32 and run by ONNX Runtime (CPU only). "auto": ONNX Runtime is a candidate
    on a CPU with the [export] extra and at least PROBE_MIN_IMAGES images to extract; then the first
    batch is split between the two and timed (_probe), and the faster extracts the rest (a
    measurement, not a guess: which wins depends on the CPU's bf16 units and on the precision).
    """

    def __init__(self, encoder: nn.Module, device: torch.device, precision: str, engine: str,
                 images: int, image_size: int, scratch: Path):
        self.device, self.precision, self.ort, self.pending = device, precision, None, False
        self.choice = {"engine": "torch", "precision": precision}
        why_not = _why_not_onnxruntime(encoder, device, images if engine == "auto" else None)
        if engine == "onnxruntime" and why_not:
            raise ValueError(f"engine onnxruntime: {why_not}")
        if engine == "auto" and why_not:
            self.choice["why"] = f"ONNX Runtime not timed: {why_not}"
        elif engine != "torch":
            try:
                self.ort = _OrtEncoder(encoder, image_size, scratch)
                self.choice, self.pending = ({"engine": "onnxruntime", "precision": "fp32"},
                                             engine == "auto")
            except Exception as e:      # a bad export or a failing runtime: auto goes on in PyTorch
                if engine == "onnxruntime":
                    raise
                log.warning("features: ONNX Runtime failed (%s); PyTorch extracts", e)
                self.choice["why"] = f"ONNX Runtime failed: {e}"
        # the PyTorch net, unless ONNX Runtime alone extracts; a module that is not an Encoder runs
        # as it is, and close() puts its training flag back
        self.net = None
        if self.ort is None or self.pending:
            self.net, self.image_dtype, self.autocast = _extraction_net(encoder, device, precision)
            self.was_training = self.net.training
            self.net.eval()

    def close(self) -> None:
        if self.net is not None:
            self.net.train(self.was_training)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self.pending:
            return self._probe(images)
        return self.ort(images) if self.choice["engine"] == "onnxruntime" else self._torch(images)

    @torch.no_grad()
    def _torch(self, images: torch.Tensor) -> np.ndarray:
        with autocast(self.autocast, self.device):
            # channels_last, as the Captioner feeds it: oneDNN convs run faster on it, fp32 too
            x = images.to(self.device, self.image_dtype, non_blocking=True,
                          memory_format=torch.channels_last)
            return self.net(x).float().cpu().numpy()

    def _probe(self, images: torch.Tensor) -> np.ndarray:
        """The batch in quarters, PyTorch, ONNX Runtime, ONNX Runtime, PyTorch (a load that rises or
        falls weighs on both alike), after a warm-up of each on 2 images; the faster per image
        extracts from here on. A batch of fewer than 8 images is too small to time: PyTorch
        extracts."""
        self.pending = False
        if len(images) < 8:
            self.choice = {"engine": "torch", "precision": self.precision,
                           "why": f"a first batch of {len(images)} images is too small "
                                  "to time the engines"}
            self.ort = None
            return self._torch(images)
        engines, out = {"torch": self._torch, "onnxruntime": self.ort}, []
        seconds, counts = dict.fromkeys(engines, 0.0), dict.fromkeys(engines, 0)
        for run in engines.values():
            run(images[:2])
        for name, part in zip(("torch", "onnxruntime", "onnxruntime", "torch"),
                              images.tensor_split(4)):
            start = time.perf_counter()
            out.append(engines[name](part))
            seconds[name] += time.perf_counter() - start
            counts[name] += len(part)
        rates = {f"{name}_img_s": round(counts[name] / seconds[name], 2) for name in engines}
        faster = max(engines, key=lambda name: rates[f"{name}_img_s"])
        self.choice = {"engine": faster,
                       "precision": "fp32" if faster == "onnxruntime" else self.precision,
                       "probe": {"images": len(images), "torch_precision": self.precision, **rates}}
        log.info("features: PyTorch (%s) %.2f img/s, ONNX Runtime (fp32) %.2f img/s "
                 "on the first batch: %s extracts", self.precision, rates["torch_img_s"],
                 rates["onnxruntime_img_s"], faster)
        if faster == "torch":
            self.ort = None
        else:
            self.net = None             # a folded copy (ORT takes only an Encoder): not needed
        return np.concatenate(out)


def _missing_onnx() -> list[str]:
    """Which of onnx and onnxruntime (the [export] extra ONNX Runtime extraction needs) are not
    installed."""
    return [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]


def _why_not_onnxruntime(encoder: nn.Module, device: torch.device,
                         images: int | None) -> str | None:
    """Why ONNX Runtime cannot (or, with `images` to go, need not) extract; None when it is a
    candidate."""
    if device.type != "cpu":
        return f"ONNX Runtime extracts on the CPU only, the device is {device}"
    if not isinstance(encoder, Encoder):
        return f"only the ResNet Encoder is exported, not a {type(encoder).__name__}"
    missing = _missing_onnx()
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e '.[export]')"
    if images is not None and images < PROBE_MIN_IMAGES:
        return (f"{images} images to extract, "
                f"fewer than the {PROBE_MIN_IMAGES} that pay for the probe")
    return None


class _OrtEncoder:
    """The folded encoder in fp32, exported to ONNX in a temporary folder under `scratch` and run
    by ONNX Runtime on as many threads as PyTorch; the export must give PyTorch's fp32 features of
    two random images within EXPORT_TOLERANCE of the largest.

    Never the int8 encoder of `export --quantize int8` (decode/quantize.py): the features a model
    trains on stay the unquantized ones (docs/design.md says why)."""

    def __init__(self, encoder: Encoder, image_size: int, scratch: Path):
        from ..decode.export import to_onnx
        from ..decode.onnx_engine import load_session

        net = encoder.folded().float().cpu()
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".encoder-onnx-", dir=scratch) as tmp:
            path = Path(tmp) / "encoder.onnx"
            to_onnx(net, (x,), path, ["images"], ["features"],
                    {"images": {0: "B"}, "features": {0: "B"}})
            # its weights are read in: the folder can go
            self.session = load_session(path, torch.get_num_threads())
        with torch.no_grad():
            want = net(x).numpy()
        difference = float(np.abs(self(x) - want).max() / max(np.abs(want).max(), 1e-12))
        if not difference <= EXPORT_TOLERANCE:
            raise RuntimeError(f"the encoder exported to ONNX gives features {difference:.3g} "
                               "of the largest away from PyTorch's "
                               f"(tolerance {EXPORT_TOLERANCE}): use engine torch")

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {"images": np.ascontiguousarray(images.float().numpy())})[0]


class _CacheWriter:
    """Appends feature rows to a cache folder; rows are on disk before progress.json counts them."""

    def __init__(self, folder: Path, names: list[str], cache: FeatureCache | None, meta):
        self.folder, self.names, self.meta = folder, names, meta
        self.done = cache.done if cache is not None else 0
        self.data = None if cache is None else \
            np.memmap(folder / FEATURES_FILE, dtype=np.float16, mode="r+", shape=cache.shape)

    def append(self, out: np.ndarray) -> None:
        largest = float(np.abs(out).max())
        if not largest <= np.finfo(np.float16).max:   # also catches NaN
            raise FloatingPointError(f"features of {self.names[self.done]} and after reach "
                                     f"{largest:.3g}, beyond float16: unusable encoder weights "
                                     "(random weights of a deep ResNet grow with depth)")
        rows = out.astype(np.float16)
        if self.data is None:          # the first batch of a new cache gives (L, C)
            self.folder.mkdir(parents=True, exist_ok=True)
            shape = (len(self.names), *rows.shape[1:])
            self.data = np.memmap(self.folder / FEATURES_FILE, dtype=np.float16, mode="w+",
                                  shape=shape)
            write_json_atomic({"done": 0}, self.folder / PROGRESS_FILE)
            write_json_atomic(self.meta(shape), self.folder / META_FILE)
        self.data[self.done:self.done + len(rows)] = rows
        self.data.flush()
        self.done += len(rows)
        write_json_atomic({"done": self.done}, self.folder / PROGRESS_FILE)

    def close(self) -> None:
        self.data = None


def _meta(key: str, names: list[str], shape: tuple, parts: dict, fingerprint: str, choice: dict,
          device: torch.device) -> dict:
    return {"key": key, "shape": list(shape), "dtype": "float16", "file": FEATURES_FILE,
            "key_parts": parts, "encoder_sha256": fingerprint,
            # not in the key, so a cache made in bf16 on a GPU also serves an fp32 run on the CPU
            "precision": choice["precision"], "engine": choice, "device": str(device),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "names": names}


