"""Captions on disk -> image-level splits -> batches.

Readers turn each supported layout into a `Corpus` (image file name -> its
captions, plus a split when the file brings one). Splits are always by image,
never by caption row, so no image sits in two splits. A batch holds B images
and all of their captions; `image_index` says which image each caption belongs
to, so the image side runs once per image, not once per caption.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from .config import Config, ConfigError
from .images import open_image
from .vocab import Vocabulary

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


@dataclass
class Corpus:
    images_dir: Path
    captions: dict[str, list[str]]            # image file name -> captions, in file order
    splits: dict[str, list[str]] | None = None  # given by the file (Karpathy), else made by `split_images`


# ---------------------------------------------------------------- readers

_ROW_NUMBER_TEXT = re.compile(r"^\s*(\d+)\s+(\S.*)$")


def read_flickr30k(captions_file: str | Path) -> tuple[dict[str, list[str]], int]:
    """The Kaggle `results.csv`: `image_name| comment_number| comment`.

    Quotes and commas inside captions are kept as written (no CSV quoting: the
    file has none). A row that lost its second `|` (`x.jpg| 4   A dog ...`) is
    repaired. Returns the captions and the number of rows skipped.
    """
    captions: dict[str, list[str]] = {}
    skipped = 0
    with open(captions_file, encoding="utf-8-sig", errors="replace") as f:
        lines = f.read().splitlines()
    if lines and lines[0].replace(" ", "").lower().startswith("image_name|"):
        lines = lines[1:]
    for line in lines:
        if not line.strip():
            continue
        parts = line.split("|", 2)
        name = parts[0].strip()
        if len(parts) == 3:
            text = parts[2].strip()
        elif len(parts) == 2 and (m := _ROW_NUMBER_TEXT.match(parts[1])):
            text = m.group(2).strip()   # the number and the caption ran together
        else:
            text = ""
        if not name or not text:
            skipped += 1
            continue
        captions.setdefault(name, []).append(text)
    return captions, skipped


def read_karpathy(captions_file: str | Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Karpathy's `dataset_flickr30k.json`, with its own split (restval joins train)."""
    with open(captions_file) as f:
        data = json.load(f)
    captions, splits = {}, {s: [] for s in SPLITS}
    for entry in data["images"]:
        name = entry["filename"]
        captions[name] = [s["raw"].strip() for s in entry["sentences"] if s.get("raw", "").strip()]
        split = {"restval": "train"}.get(entry.get("split", "train"), entry.get("split", "train"))
        splits.setdefault(split, []).append(name)
    return captions, splits


def read_csv(captions_file: str | Path) -> tuple[dict[str, list[str]], int]:
    """A plain CSV with `image,caption` columns (standard quoting)."""
    captions, skipped = {}, 0
    with open(captions_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{captions_file}: expected a header with 'image' and 'caption' columns, "
                             f"got {reader.fieldnames}")
        for row in reader:
            name, text = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if not name or not text:
                skipped += 1
                continue
            captions.setdefault(name, []).append(text)
    return captions, skipped


def read_corpus(cfg: Config, generate: bool = True) -> Corpus:
    """Read the captions named by the config and drop those whose image is missing.

    Unreadable rows and missing images are counted and reported in one warning
    each, before any training starts. With `generate`, a missing Shapes data set
    (data.format shapes) is generated first, into a new or empty folder only.
    """
    d = cfg.data
    images_dir, captions_file = Path(d.images).expanduser(), Path(d.captions).expanduser()
    if d.format == "shapes" and not captions_file.is_file() and generate:
        _generate_shapes(images_dir, captions_file, d.shapes_images)
    if not images_dir.is_dir():
        raise ConfigError(f"config key 'data.images': folder {d.images!r} does not exist")
    splits, skipped = None, 0
    if d.format in ("flickr30k", "shapes"):
        captions, skipped = read_flickr30k(captions_file)
    elif d.format == "karpathy":
        captions, splits = read_karpathy(captions_file)
    else:
        captions, skipped = read_csv(captions_file)
    if skipped:
        log.warning("%s: skipped %d unreadable row(s)", captions_file, skipped)
    present = set(os.listdir(images_dir))
    missing = [name for name in captions if name not in present]
    if missing:
        log.warning("%s: %d of %d captioned image(s) are missing from %s and are left out (e.g. %s)",
                    captions_file, len(missing), len(captions), images_dir, ", ".join(missing[:3]))
        captions = {k: v for k, v in captions.items() if k in present}
        if splits:
            splits = {s: [n for n in names if n in present] for s, names in splits.items()}
    if not captions:
        raise ValueError(f"{captions_file}: no captioned image found in {images_dir}")
    return Corpus(images_dir, captions, splits)


def _generate_shapes(images_dir: Path, captions_file: Path, n_images: int) -> None:
    """Shapes where the config expects it: captions_file's folder, with its images in flickr30k_images/."""
    from .shapes import build_shapes

    folder = captions_file.parent
    if captions_file.name != "results.csv" or images_dir.resolve() != (folder / "flickr30k_images").resolve():
        raise ConfigError(f"config key 'data.captions': {str(captions_file)!r} does not exist. (Shapes is generated "
                          "only as FOLDER/results.csv with data.images FOLDER/flickr30k_images; check both paths.)")
    log.warning("Shapes data set not found at %s: generating %d images", folder, n_images)
    build_shapes(folder, n_images)


# ---------------------------------------------------------------- splits

def split_images(names: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Image-level split, deterministic from the seed and independent of file order."""
    names = sorted(set(names))
    random.Random(seed).shuffle(names)
    n_val, n_test = round(len(names) * val_fraction), round(len(names) * test_fraction)
    return {"train": sorted(names[n_val + n_test:]), "val": sorted(names[:n_val]),
            "test": sorted(names[n_val:n_val + n_test])}


def make_splits(corpus: Corpus, cfg: Config) -> dict[str, list[str]]:
    if corpus.splits is not None:
        return {s: list(corpus.splits.get(s, [])) for s in SPLITS}
    return split_images(list(corpus.captions), cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)


def save_splits(splits: dict[str, list[str]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(splits, indent=1))


def load_splits(path: str | Path) -> dict[str, list[str]]:
    return json.loads(Path(path).read_text())


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
    """One image of a CaptionDataset: its preprocessed pixels, token ids of each caption, file name."""
    image: torch.Tensor                 # (3, H, W)
    captions: list[torch.Tensor]
    name: str


class FeatureItem(NamedTuple):
    """One image of a FeatureDataset (features.py): its cached grid features instead of its pixels."""
    features: torch.Tensor              # (L, C) float16
    captions: list[torch.Tensor]
    name: str


class CaptionDataset(Dataset):
    """One Item per image: (image tensor, [token id tensors of each caption], name)."""

    def __init__(self, corpus: Corpus, names: list[str], vocab: Vocabulary, image_size: int, max_words: int):
        self.images_dir = corpus.images_dir
        self.names = list(names)
        self.references = [corpus.captions[n] for n in self.names]     # the raw text, for caption metrics
        self.captions = [[torch.tensor(vocab.encode(c, max_words)) for c in refs] for refs in self.references]
        self.transform = build_transform(image_size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Item:
        image = open_image(self.images_dir / self.names[i])
        return Item(self.transform(image), self.captions[i], self.names[i])


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
        return Batch(move(self.tokens), move(self.image_index), self.names, move(self.images), move(self.features))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The image side as the model's keyword: {"images": ...} or {"features": ... in fp32}."""
        return {"images": self.images} if self.features is None else {"features": self.features.float()}


def collate(items: list[Item] | list[FeatureItem], pad_id: int = 0) -> Batch:
    pixels, caption_lists, names = zip(*items)
    captions = [c for cs in caption_lists for c in cs]
    index = torch.tensor([i for i, cs in enumerate(caption_lists) for _ in cs])
    tokens = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True, padding_value=pad_id)
    field = "features" if isinstance(items[0], FeatureItem) else "images"
    return Batch(tokens, index, list(names), **{field: torch.stack(pixels)})


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of an epoch, a function of (seed, epoch) alone: a resumed run sees the same one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class EpochSampler(Sampler[int]):
    """The indices one process reads in one epoch: the epoch's order, mid-epoch skip and DDP sharding.

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
            raise ValueError(f"batch_size={batch_size} must be >= 1 and divisible by the {world} processes")
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


def build_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int, seed: int = 0,
                 epoch: int = 0, pad_id: int = 0, skip_batches: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """Batches of `dataset` in the order of an EpochSampler (see there for shuffling, skip and DDP)."""
    sampler = EpochSampler(len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                           skip_batches=skip_batches, rank=rank, world=world)
    # a last training batch of one image would break BatchNorm in a trainable backbone
    drop_last = shuffle and world == 1 and len(dataset) % batch_size == 1
    # the loader's own generator seeds its workers, so building one never draws from the global RNG
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler,
                      generator=torch.Generator().manual_seed(seed), drop_last=drop_last, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      collate_fn=functools.partial(collate, pad_id=pad_id))
