"""Image-level splits -> batches: the dataset, the batch, the epoch sampler and the loader.

A batch holds B images and all of their captions; `image_index` says which image each caption
belongs to, so the image side runs once per image, not once per caption.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from .corpus import Corpus
from .images import open_image
from .vocab import Vocabulary

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- datasets

def build_transform(image_size: int) -> transforms.Compose:
    """The one preprocessing, used for training and inference alike.

    A square resize, not a crop: a crop can cut out the very object a caption
    names. No flips either: they would turn "left of" into a lie.
    """
    return transforms.Compose([
        transforms.Resize((image_size, image_size), antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class Item(NamedTuple):
    """One image of a CaptionDataset: preprocessed pixels, token ids of each caption, file name."""
    image: torch.Tensor                 # (3, H, W)
    captions: list[torch.Tensor]
    name: str


class FeatureItem(NamedTuple):
    """One image of a FeatureDataset (features.py): cached grid features instead of pixels."""
    features: torch.Tensor              # (L, C) float16
    captions: list[torch.Tensor]
    name: str


class PackedStrings(Sequence):
    """A read-only list of str held as one UTF-8 buffer and its offsets.

    A list of str is one Python object per string, and a forked DataLoader worker copies the
    memory page of each one it reads (reading writes its reference count): over an epoch, all of
    them. Two objects here, however many strings.
    """

    def __init__(self, texts: Iterable[str]):
        encoded = [t.encode() for t in texts]
        self._buffer = b"".join(encoded)
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]         # negative indices; IndexError past the end
        return self._buffer[self._ends[i - 1] if i else 0:self._ends[i]].decode()


class _TokenRows(Sequence):
    """Caption k's token ids as a 1-D LongTensor, all captions' ids in one flat int32 array."""

    def __init__(self, rows: list[list[int]]):
        self._ids = np.fromiter((t for row in rows for t in row), dtype=np.int32)
        self._ends = np.cumsum([len(row) for row in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, k: int) -> torch.Tensor:
        k = range(len(self))[k]
        ids = self._ids[self._ends[k - 1] if k else 0:self._ends[k]]
        return torch.from_numpy(ids.astype(np.int64))


class PerImage(Sequence):
    """Image i's captions as a list: rows first[i]..first[i+1]-1 of a flat sequence of captions."""

    def __init__(self, rows: Sequence, counts: list[int]):
        self._rows = rows
        self._first = np.cumsum([0, *counts], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._first) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        return [self._rows[k] for k in range(self._first[i], self._first[i + 1])]


class CaptionDataset(Dataset):
    """One Item per image: (image tensor, [token id tensors of each caption], name).

    `names[i]`, `references[i]` (the raw captions, for caption metrics) and `captions[i]` (their
    token ids) read like lists, but are held in a few flat arrays (PackedStrings, PerImage), so that
    forked DataLoader workers share them with the parent instead of copying them.
    """

    def __init__(self, corpus: Corpus, names: list[str], vocab: Vocabulary, image_size: int,
                 max_words: int):
        self.images_dir = corpus.images_dir
        names = list(names)
        counts = [len(corpus.captions[n]) for n in names]
        texts = [c for n in names for c in corpus.captions[n]]
        self.names = PackedStrings(names)
        self.references = PerImage(PackedStrings(texts), counts)
        self.captions = PerImage(_TokenRows([vocab.encode(c, max_words) for c in texts]), counts)
        self.transform = build_transform(image_size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Item:
        name = self.names[i]
        return Item(self.transform(open_image(self.images_dir / name)), self.captions[i], name)


@dataclass
class Batch:
    """B images and all N of their captions. Exactly one of `images` and `features` is set."""
    tokens: torch.Tensor                    # (N, T) every caption of every image, padded with <pad>
    image_index: torch.Tensor               # (N,) which image each caption belongs to
    names: list[str]
    images: torch.Tensor | None = None      # (B, 3, H, W) pixels
    features: torch.Tensor | None = None    # (B, L, C) the frozen encoder's cached output (fp16)

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)   # noqa: E731
        return Batch(move(self.tokens), move(self.image_index), self.names, move(self.images),
                     move(self.features))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The image side as the model's keyword: {"images": ...} or {"features": ... in fp32}."""
        return ({"images": self.images} if self.features is None
                else {"features": self.features.float()})


def collate(items: list[Item] | list[FeatureItem], pad_id: int = 0) -> Batch:
    pixels, caption_lists, names = zip(*items)
    captions = [c for cs in caption_lists for c in cs]
    index = torch.tensor([i for i, cs in enumerate(caption_lists) for _ in cs])
    tokens = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True, padding_value=pad_id)
    field = "features" if isinstance(items[0], FeatureItem) else "images"
    return Batch(tokens, index, list(names), **{field: torch.stack(pixels)})


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """An epoch's shuffled order, a function of (seed, epoch) alone: a resumed run sees the same."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class EpochSampler(Sampler[int]):
    """The indices one process reads in an epoch: the epoch's order, mid-epoch skip, DDP sharding.

    - order: `epoch_order(n, seed, epoch)` when shuffling (a function of seed and epoch alone, so a
      resumed run sees the same one), else 0..n-1;
    - `skip_batches`: a run resumed from a mid-epoch checkpoint goes on with the batch after the
      last one it took;
    - `world` > 1 processes: `batch_size` is the global batch. Shuffled (training), process `rank`
      takes its 1/world share of each global batch, so the world's k-th step sees the images one
      process's k-th step would, and a last global batch that cannot be split evenly is dropped
      (every process must take as many steps). Unshuffled (evaluation), images are sharded
      rank::world and the sums reduced.
    """

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                 skip_batches: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1 or (world > 1 and shuffle and batch_size % world):
            raise ValueError(f"batch_size={batch_size} must be >= 1 and divisible by the "
                             f"{world} processes")
        order = epoch_order(n, seed, epoch) if shuffle else list(range(n))
        order = order[skip_batches * batch_size:]
        self.batch_size = batch_size
        if world > 1 and shuffle:
            share = batch_size // world
            order = [i for k in range(0, len(order) - batch_size + 1, batch_size)
                     for i in order[k + rank * share:k + (rank + 1) * share]]
            self.batch_size = share
        elif world > 1:
            order = order[rank::world]
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def build_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int,
                 seed: int = 0, epoch: int = 0, pad_id: int = 0, skip_batches: int = 0,
                 rank: int = 0, world: int = 1) -> DataLoader:
    """Batches of `dataset` in the order of an EpochSampler (see it for shuffling, skip and DDP)."""
    sampler = EpochSampler(len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed,
                           epoch=epoch, skip_batches=skip_batches, rank=rank, world=world)
    # a last training batch of one image would break BatchNorm in a trainable backbone
    drop_last = shuffle and world == 1 and len(dataset) % batch_size == 1
    # the loader's own generator seeds its workers, so building one never draws from the global RNG
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler,
                      generator=torch.Generator().manual_seed(seed), drop_last=drop_last,
                      num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      collate_fn=functools.partial(collate, pad_id=pad_id))
