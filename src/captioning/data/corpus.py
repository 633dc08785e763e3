"""A data set as training sees it: `Corpus` (images folder, captions, the file's split), read by
`read_corpus` from the config; image-level splits."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError
from .readers import detect_format, read_captions
from .readers.common import SPLITS, Captions, split_images

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    images_dir: Path
    captions: dict[str, list[str]]              # image name (relative to images_dir) -> captions,
                                                # in file order
    splits: dict[str, list[str]] | None = None  # the file's (Karpathy, COCO, a split column),
                                                # else None: `split_images` splits
    missing: int = 0                            # captioned images left out: no file in images_dir
    skipped: int = 0                            # caption rows the reader could not read



def find_missing(images_dir: Path, names: Iterable[str]) -> list[str]:
    """The names (paths relative to `images_dir`) with no file there; each folder is listed once."""
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
    each, before any training starts (check.summary_line sums the corpus up).
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
        log.warning("%s%s", skipped_message(found, captions_file),
                    _format_hint(captions_file, found.format))
    captions, splits = found.captions, found.splits
    if missing := find_missing(images_dir, captions):
        log.warning("%s: %d of %d captioned image(s) are missing from %s and are left out "
                    "(e.g. %s); image names are read relative to data.images: check it, or list "
                    "them all with `python -m captioning check-data`",
                    captions_file, len(missing), len(captions), images_dir, ", ".join(missing[:3]))
        captions, splits = without(captions, splits, set(missing))
    if not captions:
        raise ValueError(f"{captions_file}: no captioned image found in {images_dir} "
                         f"(read {found.rows} caption row(s) as data.format {found.format}); "
                         "check data.images and data.format")
    return Corpus(images_dir, captions, splits, missing=len(missing), skipped=len(found.skipped))


def without(captions: dict[str, list[str]], splits: dict[str, list[str]] | None,
            drop: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]] | None]:
    """The captions and splits with the images in `drop` left out."""
    captions = {k: v for k, v in captions.items() if k not in drop}
    return captions, splits and {s: [n for n in names if n not in drop]
                                 for s, names in splits.items()}


def _generate_shapes(images_dir: Path, captions_file: Path, n_images: int) -> None:
    """Shapes where the config expects it: captions_file's folder, images in flickr30k_images/."""
    from .shapes import build_shapes

    folder = captions_file.parent
    if (captions_file.name != "results.csv"
            or images_dir.resolve() != (folder / "flickr30k_images").resolve()):
        raise ConfigError(f"config key 'data.captions': {str(captions_file)!r} does not exist. "
                          "(Shapes is generated only as FOLDER/results.csv with data.images "
                          "FOLDER/flickr30k_images; check both paths.)")
    log.warning("Shapes data set not found at %s: generating %d images", folder, n_images)
    build_shapes(folder, n_images)


# ---------------------------------------------------------------- splits

def make_splits(corpus: Corpus, cfg: Config) -> dict[str, list[str]]:
    if corpus.splits is not None:
        return {s: list(corpus.splits.get(s, [])) for s in SPLITS}
    return split_images(list(corpus.captions), cfg.data.val_fraction, cfg.data.test_fraction,
                        cfg.data.split_seed)


def save_splits(splits: dict[str, list[str]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(splits, indent=1))


def load_splits(path: str | Path) -> dict[str, list[str]]:
    return json.loads(Path(path).read_text())
