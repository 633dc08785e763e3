"""What every captions reader shares: `Captions` (what a reader found) and the split helpers."""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
MAX_LINE_BYTES = 1 << 16     # a longer row is broken (a lost quote swallowed the file): skipped
FORMATS = ("flickr30k", "karpathy", "coco", "csv", "jsonl")   # what a user may name (not shapes)


class WrongFormat(ValueError):
    """A file that is not what its reader reads; read_captions adds which formats to try instead."""


def format_hint(key: str = "data.format", read_as: str | None = None) -> str:
    """Which formats to name: all of them, less the one the file was just read as."""
    others = [f for f in FORMATS if f != read_as]
    return f"set {key} to one of {', '.join(others)}"


@dataclass
class Captions:
    """What a reader found in a captions file (or COCO's annotations folder)."""
    captions: dict[str, list[str]]                    # image name -> its captions, in file order
    splits: dict[str, list[str]] | None = None        # the file's own split, if it has one
    skipped: list[str] = field(default_factory=list)  # where rows were left out ("line 7", ...)
    empty: list[str] = field(default_factory=list)    # the image of each left-out empty caption
    ids: dict[int, str] = field(default_factory=dict)  # COCO image id -> name, if the file has ids
    rows: int = 0                                     # caption rows read, left-out ones included
    format: str = ""



def load_json(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                         f"a JSON Lines file (one object a line) needs data.format jsonl "
                         f"or the .jsonl extension") from None


def split_of(value, path: Path, where: str) -> str | None:
    """A split name as a file gives it: train/val/test ('restval' joins train); '' or None: none."""
    text = str(value or "").strip().lower()
    if not text:
        return None
    if text not in (*SPLITS, "restval"):
        raise ValueError(f"{path}: {where}: split {value!r} is not train, val or test "
                         "(restval counts as train); fix the value or leave the split out "
                         "to let data.split_seed split by image")
    return "train" if text == "restval" else text


def assign(assigned: dict[str, tuple[str, str]], name: str, split: str, path: Path,
           where: str) -> None:
    """Put `name` in `split`, refusing an image that an earlier row put in another split."""
    first = assigned.setdefault(name, (split, where))
    if first[0] != split:
        raise ValueError(f"{path}: image {name!r} is in two splits: {first[0]} ({first[1]}) "
                         f"and {split} ({where}); an image belongs to one split "
                         "(else it leaks from training into the scores): "
                         "give all of its rows the same split")


def splits_from(assigned: dict[str, tuple[str, str]],
                captions: dict[str, list[str]]) -> dict[str, list[str]]:
    splits = {s: [] for s in SPLITS}
    for name in captions:          # in file order; an image whose captions were all empty has none
        splits[assigned[name][0]].append(name)
    return splits



def split_images(names: list[str], val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, list[str]]:
    """Image-level split, deterministic from the seed and independent of file order."""
    names = sorted(set(names))
    random.Random(seed).shuffle(names)
    n_val, n_test = round(len(names) * val_fraction), round(len(names) * test_fraction)
    return {"train": sorted(names[n_val + n_test:]), "val": sorted(names[:n_val]),
            "test": sorted(names[n_val:n_val + n_test])}


def text_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(number, line) of a UTF-8 text file, a line at a time (a BOM dropped, the newline kept); None
    for a line over MAX_LINE_BYTES, which is read past without being held. Bytes that are not UTF-8
    are a ValueError naming the file and the line."""
    with open(path, "rb") as f:
        for number in range(1, 1 << 62):
            data = f.readline(MAX_LINE_BYTES + 1)
            if not data:
                return
            if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
                continue
            try:
                text = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {number}: not UTF-8 text ({e.reason} at byte "
                                 f"{e.start}); save the file as UTF-8") from None
            yield number, text
