"""Captions files -> `Captions`: one reader a format, one `read_captions`, one format detection.

A new format is one module here with a `read(path) -> Captions` and one entry in `READERS`.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ...config import ConfigError
from . import coco, flickr30k, karpathy, table
from .common import Captions, WrongFormat, format_hint, load_json

log = logging.getLogger(__name__)

# data.format -> the reader; coco reads a folder (annotations/) or a file, the others a file
READERS = {"flickr30k": flickr30k.read, "shapes": flickr30k.read, "karpathy": karpathy.read,
           "coco": coco.read, "csv": table.read_csv_file, "jsonl": table.read_jsonl_file}


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
    raise WrongFormat(f"{path}: cannot tell what this JSON holds (neither Karpathy's 'images' "
                      "with 'sentences' nor COCO's 'images' and 'annotations')")


def detect_format(captions_file: str | Path) -> tuple[str, str]:
    """(format, why) of a captions file, told from the file: a folder -> coco (its annotations/);
    .jsonl -> jsonl; JSON by its keys; the Kaggle results.csv by its '|'; a CSV by its header naming
    image and caption."""
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
    raise WrongFormat(f"{path}: cannot tell its format from its first line {first[:80]!r} "
                      f"(expected a CSV header naming image and caption, "
                      f"the Kaggle 'image_name| comment_number| comment', or JSON)")


def read_captions(captions_file: str | Path, fmt: str = "auto", *, split_seed: int = 0,
                  key: str = "data.format") -> Captions:
    """The captions (and the split, if the file brings one) of a captions file in format `fmt`;
    'auto' tells the format from the file and logs which it chose. `key`: what the user sets to
    choose a format (score's --format), named in the errors."""
    path = Path(captions_file).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"captions file {str(path)!r} does not exist")
    if fmt not in (*READERS, "auto"):
        what = key if key.startswith("-") else f"config key '{key}'"
        raise ConfigError(f"{what}: unknown format {fmt!r}; {format_hint(key)}, or auto")
    try:
        return _read(path, fmt, split_seed)
    except WrongFormat as e:
        told = fmt == "auto"
        read_as = getattr(e, "read_as", None)
        how = f" (read as {read_as}, told from the file)" if told and read_as else \
            "" if told else f" ({key} is {fmt})"
        raise WrongFormat(f"{e}{how}; {format_hint(key, read_as)}"
                          f"{'' if told else ', or auto'}") from None


def _read(path: Path, fmt: str, split_seed: int) -> Captions:
    if fmt == "auto":
        fmt, why = detect_format(path)
        log.info("%s: read as data.format %s (%s)", path, fmt, why)
    if path.is_dir() and fmt != "coco":
        raise ValueError(f"{path} is a folder: data.format {fmt} reads a file "
                         "(a folder is COCO's annotations/, data.format coco)")
    try:
        found = READERS[fmt](path, split_seed=split_seed) if fmt == "coco" else READERS[fmt](path)
    except WrongFormat as e:
        e.read_as = fmt
        raise
    found.format = fmt
    return found
