"""The Kaggle Flickr30k `results.csv`: `image_name| comment_number| comment` (also Shapes')."""
from __future__ import annotations

import re
from pathlib import Path

from .common import MAX_LINE_BYTES, Captions, text_lines

_ROW_NUMBER_TEXT = re.compile(r"^\s*(\d+)\s+(\S.*)$")


def read(captions_file: Path) -> Captions:
    out = Captions({})
    for number, line in text_lines(captions_file):
        if line is None:                                    # a row no caption is that long
            out.rows += 1
            out.skipped.append(f"line {number} (over {MAX_LINE_BYTES} bytes)")
            continue
        line = line.rstrip("\r\n")
        if not line.strip() or (number == 1
                                and line.replace(" ", "").lower().startswith("image_name|")):
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
    found = read(Path(captions_file))
    return found.captions, len(found.skipped)
