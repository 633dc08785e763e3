"""Captions on disk -> image-level splits -> batches.

Readers turn each supported layout (data.format: the Kaggle Flickr30k
results.csv, Karpathy's dataset_*.json, COCO's official caption files, a CSV or
JSON Lines of image and caption; `auto` tells them apart and logs which it chose)
into `Captions`, and `read_corpus` into a `Corpus`: image name, a path relative
to data.images -> its captions, plus a split when the file brings one. Splits
are always by image, never by caption row, so no image sits in two splits.
A batch holds B images and all of their captions; `image_index` says which
image each caption belongs to, so the image side runs once per image, not once
per caption.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
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
    captions: dict[str, list[str]]            # image name (relative to images_dir) -> captions, in file order
    splits: dict[str, list[str]] | None = None  # the file's (Karpathy, COCO, a split column), else `split_images`


@dataclass
class Captions:
    """What a reader found in a captions file (or COCO's annotations folder)."""
    captions: dict[str, list[str]]                    # image name -> its captions, in file order
    splits: dict[str, list[str]] | None = None        # the file's own split, if it has one
    skipped: list[str] = field(default_factory=list)  # where rows were left out ("line 7", "images[3]"), file order
    empty: list[str] = field(default_factory=list)    # the image of each left-out row whose caption was empty
    ids: dict[int, str] = field(default_factory=dict)  # COCO image id -> image name, where the file has ids
    rows: int = 0                                     # caption rows read, those left out included
    format: str = ""


# ---------------------------------------------------------------- readers

_ROW_NUMBER_TEXT = re.compile(r"^\s*(\d+)\s+(\S.*)$")
FORMAT_HINT = "set data.format (or --format) to one of flickr30k, karpathy, coco, csv, jsonl"


def _read_kaggle(captions_file: Path) -> Captions:
    out = Captions({})
    with open(captions_file, encoding="utf-8-sig", errors="replace") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.replace(" ", "").lower().startswith("image_name|")):
            continue
        out.rows += 1
        parts = line.split("|", 2)
        name = parts[0].strip()
        if len(parts) == 3:
            text = parts[2].strip()
        elif len(parts) == 2 and (m := _ROW_NUMBER_TEXT.match(parts[1])):
            text = m.group(2).strip()   # the number and the caption ran together
        else:
            text = ""
        if not name or not text:
            out.skipped.append(f"line {number}")
            if name and len(parts) > 1 and not re.sub(r"[\s\d|]", "", "|".join(parts[1:])):
                out.empty.append(name)  # nothing but the number after the name
            continue
        out.captions.setdefault(name, []).append(text)
    return out


def read_flickr30k(captions_file: str | Path) -> tuple[dict[str, list[str]], int]:
    """The Kaggle `results.csv`: `image_name| comment_number| comment`.

    Quotes and commas inside captions are kept as written (no CSV quoting: the
    file has none). A row that lost its second `|` (`x.jpg| 4   A dog ...`) is
    repaired. Returns the captions and the number of rows skipped.
    """
    found = _read_kaggle(Path(captions_file))
    return found.captions, len(found.skipped)


def load_json(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                         f"a JSON Lines file (one object a line) needs data.format jsonl or the .jsonl extension") \
            from None


def _split_of(value, path: Path, where: str) -> str | None:
    """A split name as a file gives it: train/val/test ('restval' joins train); '' or None = none given."""
    text = str(value or "").strip().lower()
    if not text:
        return None
    if text not in (*SPLITS, "restval"):
        raise ValueError(f"{path}: {where}: split {value!r} is not train, val or test (restval counts as train); "
                         "fix the value or leave the split out to let data.split_seed split by image")
    return "train" if text == "restval" else text


def _assign(assigned: dict[str, tuple[str, str]], name: str, split: str, path: Path, where: str) -> None:
    """Put `name` in `split`, refusing an image that an earlier row put in another split."""
    first = assigned.setdefault(name, (split, where))
    if first[0] != split:
        raise ValueError(f"{path}: image {name!r} is in two splits: {first[0]} ({first[1]}) and {split} ({where}); "
                         "an image belongs to one split (else it leaks from training into the scores): "
                         "give all of its rows the same split")


def _splits_from(assigned: dict[str, tuple[str, str]], captions: dict[str, list[str]]) -> dict[str, list[str]]:
    splits = {s: [] for s in SPLITS}
    for name in captions:          # in file order; an image whose captions were all empty has none
        splits[assigned[name][0]].append(name)
    return splits


def _read_karpathy(captions_file: Path) -> Captions:
    """Karpathy's dataset_{flickr8k,flickr30k,coco}.json; COCO's images lie under `filepath/filename`."""
    data = load_json(captions_file)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{captions_file}: not one of Karpathy's dataset_*.json (no 'images' list); {FORMAT_HINT}")
    out, assigned = Captions({}), {}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not entry.get("filename") or not isinstance(entry.get("sentences"), list):
            raise ValueError(f"{captions_file}: {where} has no 'filename' and 'sentences' list, as Karpathy's "
                             f"entries have; {FORMAT_HINT}")
        name = "/".join(p for p in (str(entry.get("filepath") or "").strip("/"), entry["filename"]) if p)
        _assign(assigned, name, _split_of(entry.get("split"), captions_file, where) or "train", captions_file, where)
        if isinstance(entry.get("cocoid"), int):
            out.ids[entry["cocoid"]] = name
        for k, sentence in enumerate(entry["sentences"]):
            sentence = sentence if isinstance(sentence, dict) else {}
            text = str(sentence.get("raw") or " ".join(sentence.get("tokens") or [])).strip()
            out.rows += 1
            if not text:
                out.skipped.append(f"{where}.sentences[{k}]")
                out.empty.append(name)
                continue
            out.captions.setdefault(name, []).append(text)
    out.splits = _splits_from(assigned, out.captions)
    return out


def read_karpathy(captions_file: str | Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Karpathy's `dataset_flickr30k.json` (or dataset_coco.json), with its own split (restval joins train)."""
    found = _read_karpathy(Path(captions_file))
    return found.captions, found.splits


def _coco_files(path: Path) -> list[Path]:
    files = sorted(path.glob("captions_*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no captions_*.json in this folder (format coco: data.captions names "
                                "COCO's annotations/ folder, the one with captions_train2017.json and "
                                "captions_val2017.json)")
    years = sorted({m.group(0) for f in files if (m := re.search(r"\d{4}", f.stem))})
    if len(years) > 1:      # 2014 and 2017 hold the same pictures: read together, images would sit in two splits
        raise ValueError(f"{path}: caption files of several COCO releases ({', '.join(years)}); keep one release's "
                         "captions_train/captions_val pair in the folder (or name one file in data.captions)")
    return files


def _read_coco_file(file: Path, out: Captions) -> list[str]:
    """One captions_<part>.json into `out`, its images named `<part>/<file_name>`; returns the names it captions."""
    data = load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{file}: not a COCO caption file (it needs 'images' and 'annotations' lists); {FORMAT_HINT}")
    part = file.stem.removeprefix("captions_")
    names = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            raise ValueError(f"{file}: images[{i}] has no 'id' and 'file_name', as COCO's images have")
        names[image["id"]] = out.ids[image["id"]] = f"{part}/{image['file_name']}"
    captioned = {}
    for i, annotation in enumerate(data["annotations"]):
        annotation = annotation if isinstance(annotation, dict) else {}
        name, text = names.get(annotation.get("image_id")), str(annotation.get("caption") or "").strip()
        out.rows += 1
        if name is None or not text:
            out.skipped.append(f"{file.name}: annotations[{i}]" + (" (unknown image_id)" if name is None else ""))
            out.empty.extend([name] if name else [])
            continue
        out.captions.setdefault(name, []).append(text)
        captioned[name] = None
    return list(captioned)


def _read_coco(path: Path, split_seed: int = 0) -> Captions:
    """COCO's official caption files: captions_train*.json -> train; captions_val*.json -> val and test, halved
    by image, seeded by `split_seed` (COCO's own test images have no captions)."""
    out = Captions({}, splits={s: [] for s in SPLITS})
    for file in _coco_files(path):
        part = file.stem.removeprefix("captions_")
        kind = next((s for s in ("train", "val", "test") if part.startswith(s)), None)
        if kind is None:
            raise ValueError(f"{file}: cannot tell its split from its name: COCO's are captions_train2017.json and "
                             "captions_val2017.json (or 2014); rename it, or use data.format csv/jsonl with a split")
        names = _read_coco_file(file, out)
        if kind == "val":
            halves = split_images(names, 0.5, 0.0, split_seed)
            out.splits["val"] += halves["val"]
            out.splits["test"] += halves["train"]
        else:
            out.splits[kind] += names
    return out


def read_coco(path: str | Path, split_seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """COCO's annotations/ folder (or one captions_*.json): captions by `<part>/<file_name>` and the split."""
    found = _read_coco(Path(path), split_seed)
    return found.captions, found.splits


def csv_rows(path: Path) -> Iterator[tuple[str, dict | None]]:
    """(where, row) of a CSV with a header naming 'image' and 'caption' (any case; ',' ';' or tab-separated);
    'input' stands for 'image' (as `caption --out FILE.csv` writes)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = f.readline()
        delimiter = next((d for d in (",", "\t", ";") if d in header), ",")
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = [str(n).strip().lower() for n in reader.fieldnames or []]
        if "image" not in fields and "input" in fields:
            fields = ["image" if n == "input" else n for n in fields]
        if not {"image", "caption"} <= set(fields):
            raise ValueError(f"{path}: expected a header with 'image' and 'caption' columns (and optionally 'split'), "
                             f"got {reader.fieldnames}: name the columns so, or {FORMAT_HINT}")
        reader.fieldnames = fields
        line = 2
        for row in reader:
            yield f"line {line}", row
            line = reader.line_num + 1


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict | None]]:
    """(where, object) of each non-blank line of a JSON Lines file; None for a line that is no JSON object.
    'input' stands for 'image' (as `caption --json` writes)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "image" not in row and "input" in row:
                row = {**row, "image": row["input"]}
            yield f"line {number}", row if isinstance(row, dict) else None


def _read_rows(path: Path, rows: Iterable[tuple[str, dict | None]]) -> Captions:
    """Rows of `image`, `caption` and an optional `split` (CSV or JSON Lines), as `Captions`."""
    out, assigned = Captions({}), {}
    for where, row in rows:
        out.rows += 1
        name = str((row or {}).get("image") or "").strip()
        text = (row or {}).get("caption") or ""
        text = text.strip() if isinstance(text, str) else ""     # a list or number is no caption: reported
        if not name or not text:
            out.skipped.append(where)
            out.empty.extend([name] if name else [])
            continue
        out.captions.setdefault(name, []).append(text)
        if (split := _split_of(row.get("split"), path, where)) is not None:
            _assign(assigned, name, split, path, where)
    if assigned:
        if unsplit := [n for n in out.captions if n not in assigned]:
            raise ValueError(f"{path}: image {unsplit[0]!r} has no split while others have one ({len(unsplit)} such "
                             "image(s)): give every row a split (train, val or test), or drop the split column")
        out.splits = _splits_from(assigned, out.captions)
    return out


def read_csv(captions_file: str | Path) -> tuple[dict[str, list[str]], int]:
    """A plain CSV with `image,caption` columns (standard quoting) and an optional `split` column."""
    found = _read_rows(Path(captions_file), csv_rows(Path(captions_file)))
    return found.captions, len(found.skipped)


def read_table(captions_file: str | Path, fmt: str) -> Captions:
    """CSV or JSON Lines (`fmt`) rows of image, caption and an optional split."""
    path = Path(captions_file)
    return _read_rows(path, csv_rows(path) if fmt == "csv" else jsonl_rows(path))


def _detect_json(path: Path, head: str, first: str) -> tuple[str, str]:
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        row = None
    if isinstance(row, dict) and "caption" in row and ("image" in row or "input" in row):
        return "jsonl", "one JSON object a line with 'image' and 'caption'"
    if '"sentences"' in head or '"filename"' in head:
        return "karpathy", "JSON with Karpathy's 'images' of 'filename' and 'sentences'"
    if '"annotations"' in head or '"file_name"' in head:
        return "coco", "JSON with COCO's 'images' and 'annotations'"
    data = load_json(path)       # keys beyond the first 64 KiB: read it all
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and "annotations" in data:
        return "coco", "JSON with COCO's 'images' and 'annotations'"
    if isinstance(images, list):
        return "karpathy", "JSON with an 'images' list"
    raise ValueError(f"{path}: cannot tell what this JSON holds (neither Karpathy's 'images' with 'sentences' nor "
                     f"COCO's 'images' and 'annotations'); {FORMAT_HINT}")


def detect_format(captions_file: str | Path) -> tuple[str, str]:
    """(format, why) of a captions file, told from the file: a folder -> coco (its annotations/); .jsonl -> jsonl;
    JSON by its keys; the Kaggle results.csv by its '|'; a CSV by its header naming image and caption."""
    path = Path(captions_file)
    if path.is_dir():
        return "coco", "a folder: COCO's annotations/"
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl", f"the extension {path.suffix}"
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(65536)
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if path.suffix.lower() == ".json" or first[:1] in ("{", "["):
        return _detect_json(path, head, first)
    columns = {c.strip().lower() for c in re.split(r"[,;\t]", first)}
    if {"image", "caption"} <= columns:
        return "csv", "a CSV header naming image and caption"
    if "|" in first:
        return "flickr30k", "'|'-separated rows, as in the Kaggle results.csv"
    raise ValueError(f"{path}: cannot tell its format from its first line {first[:80]!r} (expected a CSV header "
                     f"naming image and caption, the Kaggle 'image_name| comment_number| comment', or JSON); "
                     f"{FORMAT_HINT}")


def read_captions(captions_file: str | Path, fmt: str = "auto", *, split_seed: int = 0) -> Captions:
    """The captions (and the split, if the file brings one) of a captions file in format `fmt`;
    'auto' tells the format from the file and logs which it chose."""
    path = Path(captions_file).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"captions file {str(path)!r} does not exist")
    if fmt == "auto":
        fmt, why = detect_format(path)
        log.info("%s: read as data.format %s (%s)", path, fmt, why)
    if fmt == "coco":
        found = _read_coco(path, split_seed)
    elif path.is_dir():
        raise ValueError(f"{path} is a folder: data.format {fmt} reads a file (a folder is COCO's annotations/, "
                         "data.format coco)")
    elif fmt in ("flickr30k", "shapes"):
        found = _read_kaggle(path)
    elif fmt == "karpathy":
        found = _read_karpathy(path)
    elif fmt in ("csv", "jsonl"):
        found = read_table(path, fmt)
    else:
        raise ConfigError(f"config key 'data.format': unknown format {fmt!r}; {FORMAT_HINT}, or auto")
    found.format = fmt
    return found


def find_missing(images_dir: Path, names: Iterable[str]) -> list[str]:
    """The names (paths relative to `images_dir`) with no file there; each folder is listed once, however large."""
    listings: dict[str, set[str]] = {}
    missing = []
    for name in names:
        folder, _, base = name.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(images_dir / folder))
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = set()
        if base not in listings[folder]:
            missing.append(name)
    return missing


def skipped_message(found: Captions, captions_file: Path) -> str:
    where = ", ".join(found.skipped[:5]) + (", ..." if len(found.skipped) > 5 else "")
    empty = f" ({len(found.empty)} with an empty caption)" if found.empty else ""
    return f"{captions_file}: skipped {len(found.skipped)} unreadable row(s){empty}: {where}"


def _format_hint(captions_file: Path, fmt: str) -> str:
    """When rows were skipped: what the file looks like, if it is not the format it was read as."""
    try:
        detected, why = detect_format(captions_file)
    except (OSError, ValueError):
        return ""
    if detected == fmt or {detected, fmt} == {"flickr30k", "shapes"}:
        return ""
    return f"; the file looks like {detected} ({why}): set data.format {detected}, or auto"


def read_corpus(cfg: Config, generate: bool = True) -> Corpus:
    """Read the captions named by the config and drop those whose image is missing.

    Unreadable rows and missing images are counted and reported in one warning
    each, before any training starts, and a short summary of the data is logged.
    With `generate`, a missing Shapes data set (data.format shapes) is generated
    first, into a new or empty folder only.
    """
    d = cfg.data
    images_dir, captions_file = Path(d.images).expanduser(), Path(d.captions).expanduser()
    if d.format == "shapes" and not captions_file.is_file() and generate:
        _generate_shapes(images_dir, captions_file, d.shapes_images)
    if not images_dir.is_dir():
        raise ConfigError(f"config key 'data.images': folder {d.images!r} does not exist")
    found = read_captions(captions_file, d.format, split_seed=d.split_seed)
    if found.skipped:
        log.warning("%s%s", skipped_message(found, captions_file), _format_hint(captions_file, found.format))
    captions, splits = found.captions, found.splits
    if missing := find_missing(images_dir, captions):
        log.warning("%s: %d of %d captioned image(s) are missing from %s and are left out (e.g. %s); image names "
                    "are read relative to data.images: check it, or list them all with `python -m captioning "
                    "check-data`", captions_file, len(missing), len(captions), images_dir, ", ".join(missing[:3]))
        captions, splits = without(captions, splits, set(missing))
    if not captions:
        raise ValueError(f"{captions_file}: no captioned image found in {images_dir} (read {found.rows} caption "
                         f"row(s) as data.format {found.format}); check data.images and data.format")
    corpus = Corpus(images_dir, captions, splits)
    from .check import summary_line  # check.py reads through this module

    log.info("%s", summary_line(corpus, cfg, missing=len(missing), skipped=len(found.skipped)))
    return corpus


def without(captions: dict[str, list[str]], splits: dict[str, list[str]] | None,
            drop: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]] | None]:
    """The captions and splits with the images in `drop` left out."""
    captions = {k: v for k, v in captions.items() if k not in drop}
    return captions, splits and {s: [n for n in names if n not in drop] for s, names in splits.items()}


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


class PackedStrings(Sequence):
    """A read-only list of str held as one UTF-8 buffer and its offsets.

    A list of str is one Python object per string, and a forked DataLoader worker copies the memory
    page of each one it reads (reading writes its reference count): over an epoch, all of them. Two
    objects here, however many strings.
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
        return torch.from_numpy(self._ids[self._ends[k - 1] if k else 0:self._ends[k]].astype(np.int64))


class PerImage(Sequence):
    """Image i's captions as a list: rows first[i]..first[i+1]-1 of a flat sequence of all captions."""

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

    `names[i]`, `references[i]` (the raw captions, for caption metrics) and `captions[i]` (their token
    ids) read like lists, but are held in a few flat arrays (PackedStrings, PerImage), so that forked
    DataLoader workers share them with the parent instead of copying them as the epoch goes by.
    """

    def __init__(self, corpus: Corpus, names: list[str], vocab: Vocabulary, image_size: int, max_words: int):
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
