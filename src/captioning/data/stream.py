"""Training from WebDataset shards as a stream (data.format webdataset): `ShardSplit`, one split's
shards, and `build_stream_loader`, the batches one process takes of it in an epoch.

How an epoch is read, so that it is the same every time it is read (a resumed run included):

- the training shards are put in an order drawn from (seed, epoch); process `rank` of `world`
  takes every world-th of them, and on it each of its R readers (DataLoader workers, at least 1)
  every R-th: each rank and each worker reads its own shards, whole;
- a reader's samples pass through a shuffle buffer of data.shuffle_buffer samples (still encoded:
  a sample is decoded only once it leaves the buffer), drawn from (seed, epoch, rank, reader);
- the DataLoader takes one image from each reader in turn (round robin; a reader that runs out
  drops out) and the main process makes batches of them: the steps of an epoch depend on the
  sample counts and the batch size alone, not on the readers;
- every sample is read once an epoch; with several processes each takes as many steps as the
  process with the fewest samples could in any epoch, and leaves the rest of its own;
- a run resumed mid-epoch (last.pt's `batch`) reads the epoch again with the readers it began
  with, skips, without decoding them, the images the batches it took held, and goes on.

Feature shards (train.cache_features, train/feature_shards.py) hold the frozen encoder's features
of the same samples, shard for shard and in the same order: a ShardSplit of them (`features`) reads
as the image one does, FeatureItems instead of Items, the same samples in the same batches.
"""
from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import Config, ConfigError
from .corpus import save_splits
from .dataset import Batch, FeatureItem, Item, build_transform, collate
from .images import open_image
from .shards import find_shards, iter_samples
from .vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclass
class ShardSplit:
    """One split's shards, with what a loader of it needs (the CaptionDataset of a stream)."""
    split: str
    shards: list[str]
    counts: list[int]              # samples of each shard
    vocab: Vocabulary
    image_size: int
    max_words: int
    shuffle_buffer: int = 1000
    index: str | None = None       # the index.json the shards were found by, if any
    features: bool = False         # feature shards: each sample's .npy, fp16 (L, C)

    def __len__(self) -> int:
        return sum(self.counts)


def prepare_stream(cfg: Config, run_dir: Path, vocab: Vocabulary | None, rank: int = 0,
                   resume: bool = False) -> tuple[None, dict[str, ShardSplit], Vocabulary]:
    """prepare_data of data.format webdataset: train and val ShardSplits and the vocabulary (the
    index's word counts at data.min_freq, else one pass over the training captions); splits.json
    holds the index's image names."""
    found = find_shards(cfg.data.shards)
    for split in ("train", "val"):
        if not found.shards[split] or not sum(found.counts[split]):
            raise ConfigError(f"config key 'data.shards': no {split} sample in {cfg.data.shards} "
                              f"(expected shards named {split}-NNNNNN.tar)")
    vocab = vocab or found.vocabulary(cfg.data.min_freq)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not resume:
        save_splits({s: found.names.get(s, []) for s in ("train", "val", "test")},
                    run_dir / "splits.json")
    d = cfg.data
    datasets = {s: ShardSplit(s, found.shards[s], found.counts[s], vocab, d.image_size,
                              d.max_words, d.shuffle_buffer, index=found.index)
                for s in ("train", "val")}
    return None, datasets, vocab


# ---------------------------------------------------------------- which shards, which samples

def rank_shards(split: ShardSplit, *, shuffle: bool, seed: int, epoch: int, rank: int,
                world: int) -> list[tuple[str, int]]:
    """(shard, samples) of process `rank` this epoch, in reading order."""
    order = list(range(len(split.shards)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return [(split.shards[i], split.counts[i]) for i in order[rank::world]]


def steps_per_epoch(split: ShardSplit, *, batch_size: int, world: int) -> int:
    """Training steps of each process in every epoch: all samples (a last batch of one image is
    left out: it would break BatchNorm); with several processes, the full batches the process with
    the fewest samples could take in any epoch's shard order, so every process takes the same."""
    if world == 1:
        n = len(split)
        return n // batch_size + (n % batch_size > 1)
    if len(split.shards) < world:
        raise ConfigError(f"config key 'data.shards': {len(split.shards)} {split.split} shard(s) "
                          f"for {world} processes: each needs its own; write smaller ones "
                          "(`python -m captioning shards --shard-size N`)")
    fewest = sum(sorted(split.counts)[:len(split.shards) // world])
    steps = fewest // (batch_size // world)
    if steps == 0:
        smallest = len(split.shards) // world
        raise ConfigError(f"config key 'data.shards': each of {world} processes takes the full "
                          f"batches its smallest {smallest} {split.split} shard(s) hold "
                          f"({fewest} images), fewer than one batch of {batch_size // world}: "
                          "write shards of equal size (python -m captioning shards "
                          "--shard-size N)")
    left = len(split) - steps * batch_size
    if left > 0.1 * len(split):
        log.warning("%d of the %d %s images are left out of every epoch: each of %d processes "
                    "takes as many steps as the one with the fewest images; a number of shards "
                    "that is a multiple of the processes, of equal size, leaves out the fewest",
                    left, len(split), split.split, world)
    return steps


def taken_per_reader(counts: list[int], items: int) -> list[int]:
    """How many of each reader's samples the first `items` of a round robin over readers with
    `counts` samples hold (the DataLoader's order: one from each reader in turn, a reader that
    runs out dropping out)."""
    return resume_point(counts, items)[0]


def resume_point(counts: list[int], items: int) -> tuple[list[int], int]:
    """taken_per_reader, and the reader whose turn comes next: a new DataLoader starts its round
    at worker 0, so the stream maps worker w to reader (next + w) % readers."""
    taken = [0] * len(counts)
    while items > 0:
        live = [r for r, n in enumerate(counts) if taken[r] < n]
        if not live:
            break
        rounds = min(min(counts[r] - taken[r] for r in live), items // len(live))
        if rounds:                      # whole rounds at once
            for r in live:
                taken[r] += rounds
            items -= rounds * len(live)
            continue
        for r in live[:items]:          # a last, partial round: the next is the one after them
            taken[r] += 1
        return taken, live[items]
    return taken, 0


# ---------------------------------------------------------------- the stream

class ShardStream(IterableDataset):
    """The Items one process reads of its shards (`rank_shards`) in an epoch, its readers each
    skipping the first `skip[reader]` of their samples; loader worker w reads reader
    (first + w) % readers (a resumed round goes on with the reader whose turn it was)."""

    def __init__(self, split: ShardSplit, shards: list[tuple[str, int]], *, readers: int,
                 shuffle: bool, seed: int, epoch: int, rank: int, skip: list[int],
                 first: int = 0):
        self.split, self.shards, self.readers = split, shards, readers
        self.shuffle, self.seed, self.epoch, self.rank, self.skip = shuffle, seed, epoch, rank, skip
        self.first = first

    def reader_counts(self) -> list[int]:
        return [sum(n for _, n in self.shards[r::self.readers]) for r in range(self.readers)]

    def __len__(self) -> int:
        return sum(self.reader_counts()) - sum(self.skip)

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        reader = (self.first + (0 if info is None else info.id)) % self.readers
        samples = (s for url, _ in self.shards[reader::self.readers] for s in iter_samples(url))
        if self.shuffle:
            rng = random.Random(((self.seed * 100_003 + self.epoch) * 1_009 + self.rank) * 1_009
                                + reader)
            samples = shuffled(samples, self.split.shuffle_buffer, rng)
        transform, vocab = build_transform(self.split.image_size), self.split.vocab
        for i, (_, data, _, meta) in enumerate(samples):
            if i < self.skip[reader]:
                continue
            name = meta.get("name", "")
            captions = [torch.tensor(vocab.encode(c, self.split.max_words))
                        for c in meta.get("captions", [])]
            if self.split.features:
                yield FeatureItem(torch.from_numpy(np.load(io.BytesIO(data))), captions, name)
            else:
                yield Item(transform(open_image(data)), captions, name)


def shuffled(samples, buffer_size: int, rng: random.Random):
    """Samples in a random order within a window of `buffer_size` (webdataset's shuffle)."""
    buffer = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        k = rng.randrange(buffer_size)
        buffer[k], sample = sample, buffer[k]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class StreamLoader:
    """Batches of `steps` x `batch_size` images from a ShardStream, made in this process."""

    def __init__(self, loader: DataLoader, *, batch_size: int, steps: int, pad_id: int):
        self.loader, self.batch_size, self.steps, self.pad_id = loader, batch_size, steps, pad_id

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        items, taken = [], 0
        for item in self.loader:
            if taken == self.steps:
                break
            items.append(item)
            if len(items) == self.batch_size:
                yield collate(items, self.pad_id)
                items, taken = [], taken + 1
        if items and taken < self.steps:
            yield collate(items, self.pad_id)


def build_stream_loader(split: ShardSplit, *, batch_size: int, shuffle: bool, num_workers: int,
                        seed: int = 0, epoch: int = 0, pad_id: int = 0, skip_batches: int = 0,
                        rank: int = 0, world: int = 1) -> StreamLoader:
    """build_loader's batches, of a ShardSplit: training (`shuffle`) takes `steps_per_epoch`
    batches of batch_size // world images from its shards; evaluation all of its shards' images
    in batches of batch_size."""
    shards = rank_shards(split, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world=world)
    readers = max(1, num_workers)
    share = batch_size // world if shuffle else batch_size
    if shuffle:
        steps = steps_per_epoch(split, batch_size=batch_size, world=world)
    else:
        steps = -(-sum(n for _, n in shards) // batch_size)
    probe = ShardStream(split, shards, readers=readers, shuffle=shuffle, seed=seed, epoch=epoch,
                        rank=rank, skip=[0] * readers)
    skip, first = resume_point(probe.reader_counts(), skip_batches * share)
    stream = ShardStream(split, shards, readers=readers, shuffle=shuffle, seed=seed, epoch=epoch,
                         rank=rank, skip=skip, first=first)
    # its own generator seeds its workers: building a loader never draws from the global RNG
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed),
                        prefetch_factor=2 * share if num_workers else None)
    return StreamLoader(loader, batch_size=share, steps=steps - skip_batches, pad_id=pad_id)


def any_loader(dataset, **kwargs):
    """build_loader for a CaptionDataset or FeatureDataset, build_stream_loader for a ShardSplit."""
    from .dataset import build_loader

    build = build_stream_loader if isinstance(dataset, ShardSplit) else build_loader
    return build(dataset, **kwargs)

