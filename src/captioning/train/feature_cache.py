"""The frozen encoder's feature cache on disk: its key, reading it back, and training on it.

    <root>/<key>/features.f16     raw float16, shape (N, L, C), row i = names[i]
    <root>/<key>/meta.json        key, names, shape, dtype and what went into the key
    <root>/<key>/progress.json    {"done": rows written}: an interrupted extraction resumes there

The key (`cache_key`) covers everything that changes the features -- backbone, stages, weights,
image size, preprocessing, the image files themselves -- so a change means a new folder, never a
stale one.
`features.extract_features` writes a cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset

from ..config import Config
from ..data.dataset import CaptionDataset, FeatureItem, build_transform
from ..files import write_atomic
from ..model.backbone import Encoder

log = logging.getLogger(__name__)
FORMAT_VERSION = 1           # part of the key: a new layout never reads an old cache
FEATURES_FILE, META_FILE, PROGRESS_FILE = "features.f16", "meta.json", "progress.json"


# ---------------------------------------------------------------- the key

def key_parts(cfg: Config, names: list[str], images_dir: str | Path | None = None) -> dict:
    """What the features depend on, as plain values (stored in meta.json; hashed by `cache_key`)."""
    images_dir = Path(images_dir if images_dir is not None
                      else cfg.data.images).expanduser().resolve()
    files = hashlib.sha256()
    for name in names:
        st = os.stat(images_dir / name)
        files.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {
        **encoder_parts(cfg),
        "images_dir": str(images_dir),
        "images": len(names),
        "files_sha256": files.hexdigest(),   # names in order, each with its size and mtime_ns
    }


def encoder_parts(cfg: Config) -> dict:
    """What turns an image into its features: the encoder's identity and the preprocessing (the
    part of a key that the folder cache and feature shards share)."""
    m = cfg.model
    weights = torchvision.models.get_model_weights(m.backbone).DEFAULT if m.pretrained else None
    return {
        "format": FORMAT_VERSION,
        "backbone": m.backbone,
        "backbone_stages": m.backbone_stages,
        "pretrained": m.pretrained,
        "weights": weights.name if weights else "none",
        "weights_url": weights.url if weights else "none",
        # random weights come from the seed (see build_encoder); ImageNet weights do not
        "seed": None if m.pretrained else cfg.seed,
        "image_size": cfg.data.image_size,
        "transform": repr(build_transform(cfg.data.image_size)),
    }


def cache_key(cfg: Config, names: list[str], images_dir: str | Path | None = None) -> str:
    """16 hex digits naming the cache folder; `images_dir` defaults to cfg.data.images."""
    return digest(key_parts(cfg, names, images_dir))


def digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- encoder

def build_encoder(cfg: Config) -> Encoder:
    """The frozen encoder `build_model(cfg.model, ...)` makes right after
    `torch.manual_seed(cfg.seed)`.

    The encoder is the first module CaptionModel builds, so with random weights
    (pretrained=False) seeding first gives the training model's very weights.
    The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = Encoder(cfg.model.backbone, cfg.model.pretrained, trainable=False,
                          stages=cfg.model.backbone_stages)
    return encoder.eval()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 of the weights and buffers, as fp32: tells apart encoders the key cannot (seed,
    checkpoint)."""
    digest = hashlib.sha256()
    for tensor in encoder.state_dict().values():
        t = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- reading

class FeatureCache:
    """A (complete or partial) cache folder, read-only: `cache[i]` or `cache.get(name)` -> fp16
    (L, C)."""

    def __init__(self, folder: Path, meta: dict, done: int):
        self.folder, self.meta, self.done = folder, meta, done
        self.names: list[str] = meta["names"]
        self.shape: tuple[int, int, int] = tuple(meta["shape"])     # (N, L, C)
        self._rows = {name: i for i, name in enumerate(self.names)}
        self._data = None

    @classmethod
    def open(cls, folder: str | Path) -> FeatureCache:
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        return cls(folder, meta, _read_done(folder))

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def complete(self) -> bool:
        return self.done == self.shape[0]

    @property
    def data(self) -> np.memmap:
        if self._data is None:   # opened lazily, so a DataLoader worker maps the file itself
            self._data = np.memmap(self.folder / FEATURES_FILE, dtype=np.float16, mode="r",
                                   shape=self.shape)
        return self._data

    def __getstate__(self):
        # pickling a memmap would copy the whole file into the pickle (spawned DataLoader workers)
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __contains__(self, name: str) -> bool:
        return name in self._rows

    def index(self, name: str) -> int:
        try:
            return self._rows[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the feature cache {self.folder}") from None

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a cache of {len(self)} images")
        i = i % len(self)
        if i >= self.done:
            raise IndexError(f"row {i} of {self.folder} is not extracted yet "
                             f"({self.done} of {len(self)} done)")
        return torch.from_numpy(np.array(self.data[i]))     # (L, C) fp16, a copy: map is read-only

    def get(self, name: str) -> torch.Tensor:
        return self[self.index(name)]


def _read_done(folder: Path) -> int:
    try:
        return int(json.loads((folder / PROGRESS_FILE).read_text())["done"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def write_json_atomic(obj: dict, path: Path) -> None:
    write_atomic(path, lambda f: json.dump(obj, f, indent=1), "w")




# ---------------------------------------------------------------- training on features

class FeatureDataset(Dataset):
    """CaptionDataset's items with the image replaced by its cached features:
    FeatureItem(fp16 (L, C), captions, name).

    `data.collate` stacks them into Batch.features of shape (B, L, C); the model
    takes them as `model(tokens, image_index, features=batch.features.float())`.
    """

    def __init__(self, cache: FeatureCache, dataset: CaptionDataset):
        if not cache.complete:
            raise ValueError(f"feature cache {cache.folder} is incomplete "
                             f"({cache.done} of {len(cache)}): "
                             "run extract_features again to finish it")
        missing = [n for n in dataset.names if n not in cache]
        if missing:
            raise KeyError(f"{len(missing)} image(s) are not in the feature cache {cache.folder} "
                           f"(e.g. {missing[0]})")
        self.cache = cache
        self.names, self.captions, self.references = (dataset.names, dataset.captions,
                                                      dataset.references)
        # no Python ints: see PackedStrings
        self.rows = np.array([cache.index(n) for n in self.names], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> FeatureItem:
        return FeatureItem(self.cache[int(self.rows[i])], self.captions[i], self.names[i])

