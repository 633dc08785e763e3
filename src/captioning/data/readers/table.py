"""A CSV or a JSON Lines file of image, caption and an optional split."""
from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from .common import (
    MAX_LINE_BYTES,
    Captions,
    WrongFormat,
    assign,
    split_of,
    splits_from,
    text_lines,
)


def csv_rows(path: Path) -> Iterator[tuple[str, dict | None]]:
    """(where, row) of a CSV with a header naming 'image' and 'caption' (any case; ',' ';' or
    tab-separated); 'input' stands for 'image' (as `caption --out FILE.csv` writes)."""
    lines, long, delimiter = text_lines(path), [], ","

    def text():                   # the CSV's lines; one over MAX_LINE_BYTES reads as an empty row
        for number, line in lines:
            if line is None:
                long.append(number)
            yield delimiter + "\n" if line is None else line

    lines_text = text()
    header = next(lines_text, "")
    delimiter = next((d for d in (",", "\t", ";") if d in header), ",")
    reader = csv.DictReader(itertools.chain([header], lines_text), delimiter=delimiter)
    fields = [str(n).strip().lower() for n in reader.fieldnames or []]
    if "image" not in fields and "input" in fields:
        fields = ["image" if n == "input" else n for n in fields]
    if not {"image", "caption"} <= set(fields):
        raise WrongFormat(f"{path}: expected a header with 'image' and 'caption' columns "
                          f"(and optionally 'split'), got {reader.fieldnames}: name the "
                          "columns so, or the file is another format")
    reader.fieldnames = fields
    line = 2
    for row in reader:
        too_long = f" (over {MAX_LINE_BYTES} bytes)" if long and long[-1] == line else ""
        yield f"line {line}{too_long}", None if too_long else row
        line = reader.line_num + 1


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict | None]]:
    """(where, object) of each non-blank line of a JSON Lines file; None for a line that is no JSON
    object. 'input' stands for 'image' (as `caption --json` writes)."""
    for number, line in text_lines(path):
        if line is None:
            yield f"line {number} (over {MAX_LINE_BYTES} bytes)", None
        elif line.strip():
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
        text = text.strip() if isinstance(text, str) else ""  # a list or number: no caption
        if not name or not text:
            out.skipped.append(where)
            out.empty.extend([name] if name else [])
            continue
        out.captions.setdefault(name, []).append(text)
        if (split := split_of(row.get("split"), path, where)) is not None:
            assign(assigned, name, split, path, where)
    if assigned:
        if unsplit := [n for n in out.captions if n not in assigned]:
            raise ValueError(f"{path}: image {unsplit[0]!r} has no split while others have one "
                             f"({len(unsplit)} such image(s)): give every row a split "
                             "(train, val or test), or drop the split column")
        out.splits = splits_from(assigned, out.captions)
    return out


def read_csv(captions_file: str | Path) -> tuple[dict[str, list[str]], int]:
    """A plain CSV with `image,caption` columns (standard quoting) and an optional `split`."""
    found = _read_rows(Path(captions_file), csv_rows(Path(captions_file)))
    return found.captions, len(found.skipped)


def read_table(captions_file: str | Path, fmt: str) -> Captions:
    """CSV or JSON Lines (`fmt`) rows of image, caption and an optional split."""
    path = Path(captions_file)
    return _read_rows(path, csv_rows(path) if fmt == "csv" else jsonl_rows(path))


def read_csv_file(path: Path) -> Captions:
    return read_table(path, "csv")


def read_jsonl_file(path: Path) -> Captions:
    return read_table(path, "jsonl")
