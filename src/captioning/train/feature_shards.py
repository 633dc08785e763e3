"""The frozen encoder's features of WebDataset shards, as shards (train.cache_features with
data.format webdataset):

    <root>/<key>/SPLIT-NNNNNN.tar   the features of the split's i-th image shard, sample for sample
                                    and in its order: {key}.npy (fp16 (L, C)) and the image's
                                    {key}.json
    <root>/<key>/features.json      what went into the key and the encoder's sha256 (written first)
    <root>/<key>/index.json         each feature shard's sample count, as the `shards` command
                                    writes it, and the engine that extracted them: written last, so
                                    a folder without one is unfinished

<root> is `features/` beside the image shards when they are local and that folder can be written,
else data.features_dir. The key covers what changes the features: the encoder and preprocessing
(feature_cache.encoder_parts) and the image shards (each one's place and count, the index's bytes,
a local shard's size and mtime). A writer killed part way leaves the shards it finished (each
written whole or not at all, feature_cache's rule); the next run writes the others, then the index.

Why shards and not the folder cache: a stream reads each sample once an epoch, in shard order, on
any node; features stored the same way are read by the same stream (data/stream.py) in the same
order, so the splitting between processes and the exact resume hold unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..config import Config
from ..data.dataset import build_transform
from ..data.images import open_image
from ..data.shards import (
    INDEX_FORMAT,
    INDEX_NAME,
    ShardError,
    is_url,
    iter_samples,
    read_text,
    write_shard,
)
from ..data.stream import ShardSplit
from ..device import resolve_precision
from ..files import exclusive, remove_temporary, write_atomic
from .feature_cache import digest, encoder_fingerprint, encoder_parts, write_json_atomic
from .features import Extractor

log = logging.getLogger(__name__)
FEATURES_META = "features.json"


def feature_streams(cfg: Config, splits: dict[str, ShardSplit], encoder: nn.Module, *,
                    device: torch.device, precision: str, progress: bool = True,
                    batch_size: int = 64) -> dict[str, ShardSplit]:
    """The ShardSplits of `splits`' feature shards, written first when they are not all there
    (the encoder runs only then); each reads the same samples as its image split, as features."""
    parts = key_parts(cfg, splits)
    folder = feature_root(cfg, splits["train"]) / digest(parts)
    fingerprint = encoder_fingerprint(encoder)
    if not _finished(folder, fingerprint):
        folder.mkdir(parents=True, exist_ok=True)
        with exclusive(folder / ".lock"):   # one writer: another run on these shards waits for it
            if not _finished(folder, fingerprint):
                _write(cfg, splits, folder, parts, fingerprint, encoder, device=device,
                       precision=precision, progress=progress, batch_size=batch_size)
    return {s: dataclasses.replace(d, index=str(folder / INDEX_NAME), features=True,
                                   shards=[str(folder / _name(d, i))
                                           for i in range(len(d.shards))])
            for s, d in splits.items()}


def key_parts(cfg: Config, splits: dict[str, ShardSplit]) -> dict:
    """What the feature shards depend on, as plain values (features.json; hashed into the key)."""
    listing = hashlib.sha256()
    for name, split in splits.items():
        for url, count in zip(split.shards, split.counts):
            line = f"{name}\t{url}\t{count}"
            if not is_url(url):
                st = os.stat(_local(url))
                line += f"\t{st.st_size}\t{st.st_mtime_ns}"
            listing.update(f"{line}\n".encode())
    index = read_text(splits["train"].index) if splits["train"].index else None
    return {**encoder_parts(cfg), "kind": "shards", "shards_sha256": listing.hexdigest(),
            "samples": {s: len(d) for s, d in splits.items()},
            "index_sha256": hashlib.sha256(index.encode()).hexdigest() if index else None}


def feature_root(cfg: Config, train: ShardSplit) -> Path:
    """`features/` beside the image shards when they are local and it can be written there, else
    data.features_dir."""
    first = train.shards[0]
    if not is_url(first):
        beside = Path(_local(first)).parent
        if os.access(beside, os.W_OK):
            return beside / "features"
        log.info("feature shards: %s cannot be written, so they go to data.features_dir (%s)",
                 beside, cfg.data.features_dir)
    return Path(cfg.data.features_dir).expanduser()


def _local(url: str) -> str:
    return url.removeprefix("file://")


def _name(split: ShardSplit, i: int) -> str:
    return f"{split.split}-{i:06d}.tar"


def _finished(folder: Path, fingerprint: str) -> bool:
    """Whether `folder` holds finished feature shards (its index), made by this encoder."""
    for name in (INDEX_NAME, FEATURES_META):
        path = folder / name
        if path.is_file():
            made_by = json.loads(path.read_text()).get("encoder_sha256")
            if made_by != fingerprint:
                raise ValueError(f"{folder}: feature shards of other encoder weights than these: "
                                 "with model.pretrained=false, build the model right after "
                                 "torch.manual_seed(cfg.seed), as build_encoder does, "
                                 "or delete the folder")
            if name == INDEX_NAME:
                return True
    return False


class _ShardImages(IterableDataset):
    """(job, key, meta, image tensor) of each sample of the shards `jobs` names, then (job, None,
    None, None) when that shard is read; reader (worker) w reads jobs w, w + R, ..."""

    def __init__(self, jobs: list[tuple[str, int, str]], image_size: int):
        self.jobs, self.image_size = jobs, image_size

    def __iter__(self):
        info = get_worker_info()
        reader, readers = (0, 1) if info is None else (info.id, info.num_workers)
        transform = build_transform(self.image_size)
        for job in range(reader, len(self.jobs), readers):
            for key, data, _, meta in iter_samples(self.jobs[job][2]):
                yield job, key, meta, transform(open_image(data))
            yield job, None, None, None


def _write(cfg: Config, splits: dict[str, ShardSplit], folder: Path, parts: dict,
           fingerprint: str, encoder: nn.Module, *, device: torch.device, precision: str,
           progress: bool, batch_size: int) -> None:
    """Write the feature shards `folder` lacks, then its index (see the module's docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / FEATURES_META).is_file():
        write_json_atomic({**parts, "encoder_sha256": fingerprint}, folder / FEATURES_META)
    jobs = [(_name(d, i), count, url) for d in splits.values()
            for i, (url, count) in enumerate(zip(d.shards, d.counts))]
    for name, *_ in jobs:
        remove_temporary(folder, name)
    todo = [job for job in jobs if not (folder / job[0]).is_file()]
    images = sum(job[1] for job in todo)
    log.info("feature shards: %d image(s) of %d shard(s) into %s", images, len(todo), folder)
    extractor = Extractor(encoder, device, resolve_precision(precision, device), "auto", images,
                          cfg.data.image_size, folder.parent)
    loader = DataLoader(_ShardImages(todo, cfg.data.image_size), batch_size=None,
                        num_workers=cfg.train.num_workers, generator=torch.Generator())
    bar = tqdm(total=images, desc="feature shards", unit="img", disable=not progress)
    try:
        _extract(loader, extractor, folder, todo, batch_size, bar)
    finally:
        bar.close()
        extractor.close()
    index = {"format": INDEX_FORMAT, "features": {"key": folder.name, "engine": extractor.choice},
             "encoder_sha256": fingerprint,
             "splits": {s: {"shards": {_name(d, i): n for i, n in enumerate(d.counts)},
                            "samples": len(d)} for s, d in splits.items()}}
    write_atomic(folder / INDEX_NAME, lambda f: f.write(json.dumps(index, indent=1)), mode="w")


def _extract(loader, extractor: Extractor, folder: Path, todo: list, batch_size: int, bar) -> None:
    """Run the images through the encoder in batches of `batch_size`; write each shard once its
    last sample's features are in (the readers' shards end in any order)."""
    pending, rows, read = [], {job: [] for job in range(len(todo))}, set()

    def write_read() -> None:
        for job in sorted(read):
            if all(p[0] != job for p in pending):
                _finish(folder, todo[job], rows.pop(job))
                read.discard(job)

    def extract() -> None:
        out = _fp16(extractor(torch.stack([image for *_, image in pending])), pending)
        for (job, key, meta, _), features in zip(pending, out):            # (L, C) each
            rows[job].append((key, _npy(features), "npy", meta))
        bar.update(len(pending))
        pending.clear()
        write_read()

    for job, key, meta, image in loader:
        if key is None:                 # shard `job` is read
            read.add(job)
            write_read()
        else:
            pending.append((job, key, meta, image))
            if len(pending) == batch_size:
                extract()
    if pending:
        extract()


def _finish(folder: Path, job: tuple[str, int, str], samples: list) -> None:
    name, count, url = job
    if len(samples) != count:
        raise ShardError(f"{url}: {len(samples)} sample(s), its index says {count}: "
                         "write the shards again (`python -m captioning shards`)")
    write_shard(folder / name, samples)


def _fp16(out: np.ndarray, pending: list) -> np.ndarray:
    largest = float(np.abs(out).max())
    if not largest <= np.finfo(np.float16).max:   # also catches NaN
        raise FloatingPointError(f"features of {pending[0][2].get('name', pending[0][1])} and "
                                 f"after reach {largest:.3g}, beyond float16: unusable encoder "
                                 "weights (random weights of a deep ResNet grow with depth)")
    return out.astype(np.float16)


def _npy(features: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(features))
    return buffer.getvalue()
