"""check-data: what is wrong with a data set, found before hours of training.

`check_data(cfg)` reads the captions through the same readers as training, opens every image
(in a thread pool, through the safe loader `images.open_image`) and reports, by name, what
training would trip over or silently learn from: missing and unreadable images, images smaller
than the model's input, empty and duplicate captions, captions longer than data.max_words, the
share of words that become <unk>, and the split sizes. `summary_line` is the part that opens no
image, logged before every training run.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Config
from ..files import write_atomic
from .corpus import Corpus, find_missing, make_splits, skipped_message, without
from .images import open_image
from .readers import read_captions
from .vocab import tokenize

EXAMPLES = 5        # names shown per problem on the terminal (the JSON lists them all)


def spread(values: list[int]) -> dict[str, float]:
    """min, median, 95th percentile and max of counts (zeros when there are none)."""
    values = sorted(values)
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    p95 = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
    return {"min": values[0], "median": statistics.median(values), "p95": p95, "max": values[-1]}


def caption_stats(captions: dict[str, list[str]], max_words: int) -> dict:
    """Captions per image, caption length in words (as the vocabulary counts them), duplicates."""
    lengths = [len(tokenize(c)) for caps in captions.values() for c in caps]
    duplicates = sorted(name for name, caps in captions.items()
                        if len({" ".join(tokenize(c)) for c in caps}) < len(caps))
    return {"captions": len(lengths),
            "captions_per_image": spread([len(c) for c in captions.values()]),
            "caption_words": {**spread(lengths), "max_words": max_words,
                              "over_max_words": sum(n > max_words for n in lengths)},
            "duplicate_captions": duplicates}


def vocabulary_stats(captions: dict[str, list[str]], train: list[str], min_freq: int) -> dict:
    """The vocabulary training would build (train words seen at least min_freq times) and the share
    of the train split's words that become <unk> with it."""
    counts = Counter(w for name in (train or captions) for c in captions[name] for w in tokenize(c))
    kept = sum(n for n in counts.values() if n >= min_freq)
    total = sum(counts.values())
    return {"min_freq": min_freq, "size": sum(n >= min_freq for n in counts.values()),
            "unk_share": (total - kept) / total if total else 0.0}


def summary_line(corpus: Corpus, cfg: Config) -> str:
    """One line on the data a run trains on, from the captions alone (no image is opened)."""
    stats = caption_stats(corpus.captions, cfg.data.max_words)
    splits = make_splits(corpus, cfg)
    per, words = stats["captions_per_image"], stats["caption_words"]
    split_by = ("from the file" if corpus.splits is not None
                else f"by data.split_seed={cfg.data.split_seed}")
    return (f"data: {len(corpus.captions)} images ({corpus.missing} missing), "
            f"{stats['captions']} captions "
            f"({per['min']}/{per['median']:g}/{per['max']} per image), "
            f"{corpus.skipped} row(s) skipped, "
            f"{len(stats['duplicate_captions'])} image(s) with a duplicate caption; "
            f"words per caption {words['median']:g} median, "
            f"{words['p95']} at the 95th percentile, {words['max']} max "
            f"({words['over_max_words']} longer than data.max_words={cfg.data.max_words}); split "
            f"{' / '.join(f'{s} {len(n)}' for s, n in splits.items())} images ({split_by}). "
            f"`python -m captioning check-data` also opens every image.")


def _inspect(path: Path) -> tuple[int, int] | str:
    """The size of an image as training would see it, or why it cannot be opened."""
    try:
        return open_image(path).size
    except Exception as e:  # noqa: BLE001 -- any failure is reported by name, the others go on
        return str(e) or type(e).__name__


def open_images(images_dir: Path, names: list[str], *, workers: int | None = None,
                progress: bool = True) -> dict[str, tuple[int, int] | str]:
    """{name: (width, height)} of each image that opens, {name: why} of each that does not."""
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_inspect, [images_dir / n for n in names])
        return dict(zip(names, tqdm(results, total=len(names), desc="opening images",
                                    disable=not progress)))


def require_folder(out: str | Path | None) -> None:
    """Refuse an --out whose folder does not exist, before the work rather than after it."""
    if out is not None and not Path(out).expanduser().resolve().parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {Path(out).expanduser().resolve().parent} "
                                "does not exist; create it first")


def check_data(cfg: Config, *, workers: int | None = None, progress: bool = True,
               out: str | Path | None = None) -> dict:
    """The data check as a JSON-ready dict (written to `out` too, atomically); `usable` counts the
    images with a caption that exist and open: none means there is nothing to train on."""
    require_folder(out)
    d = cfg.data
    report = _check_shards(cfg, progress) if d.format == "webdataset" else None
    if report is not None:
        if out is not None:
            write_atomic(out, lambda f: json.dump(report, f, indent=1), "w")
        return report
    images_dir, captions_file = Path(d.images).expanduser(), Path(d.captions).expanduser()
    found = read_captions(captions_file, d.format, split_seed=d.split_seed)
    missing = find_missing(images_dir, found.captions)
    captions, splits = without(found.captions, found.splits, set(missing))
    opened = open_images(images_dir, list(captions), workers=workers, progress=progress)
    unreadable = {n: why for n, why in opened.items() if isinstance(why, str)}
    small = sorted(n for n, size in opened.items()
                   if not isinstance(size, str) and min(size) < d.image_size)
    corpus = Corpus(images_dir, captions, splits)
    split_names = make_splits(corpus, cfg)
    report = {"format": found.format, "captions_file": str(captions_file),
              "images_dir": str(images_dir),
              "rows": found.rows, "skipped_rows": found.skipped, "images": len(found.captions),
              **caption_stats(found.captions, d.max_words),
              "missing_images": missing, "unreadable_images": sorted(unreadable),
              "unreadable_reasons": unreadable,
              "small_images": small, "image_size": d.image_size,
              "empty_captions": sorted(set(found.empty)),
              "vocabulary": vocabulary_stats(captions, split_names["train"], d.min_freq),
              "splits": {s: len(names) for s, names in split_names.items()},
              "splits_from": "file" if splits is not None else f"data.split_seed={d.split_seed}",
              "usable_images": len(captions) - len(unreadable)}
    report["unk_share"] = report["vocabulary"]["unk_share"]
    if found.skipped:
        report["skipped_message"] = skipped_message(found, captions_file)
    if out is not None:
        write_atomic(out, lambda f: json.dump(report, f, indent=1), "w")
    return report


def _check_shards(cfg: Config, progress: bool) -> dict:
    """check_data of data.format webdataset: every shard read, every image decoded, each shard's
    count against its index; the report has check_data's keys (and `shard_problems`)."""
    from .shards import find_shards, scan_shards

    d = cfg.data
    found = find_shards(d.shards)
    scan = scan_shards(found, progress)
    captions, sizes = scan["captions"], scan["sizes"]
    unreadable = {n: why for n, why in sizes.items() if isinstance(why, str)}
    vocabulary = vocabulary_stats(captions, scan["splits"].get("train", []), d.min_freq)
    return {"format": "webdataset", "captions_file": d.shards, "images_dir": d.shards,
            "rows": len(captions), "skipped_rows": [], "images": len(captions),
            **caption_stats(captions, d.max_words),
            "missing_images": [], "unreadable_images": sorted(unreadable),
            "unreadable_reasons": unreadable,
            "small_images": sorted(n for n, size in sizes.items()
                                   if not isinstance(size, str) and min(size) < d.image_size),
            "image_size": d.image_size,
            "empty_captions": sorted(n for n, caps in captions.items() if not caps),
            "vocabulary": vocabulary, "unk_share": vocabulary["unk_share"],
            "splits": {s: len(names) for s, names in scan["splits"].items()},
            "splits_from": "shards", "shard_problems": scan["problems"],
            "usable_images": sum(1 for n, caps in captions.items()
                                 if caps and n not in unreadable)}


def _names(names: list[str]) -> str:
    return ", ".join(names[:EXAMPLES]) + (f", ... ({len(names)} in all)" if len(names) > EXAMPLES
                                          else "")


def format_report(report: dict) -> str:
    """The check as a table for the terminal; each problem with up to EXAMPLES names."""
    per, words, vocab = report["captions_per_image"], report["caption_words"], report["vocabulary"]
    rows = [("captions", f"{report['captions_file']} (read as {report['format']})"),
            ("images folder", report["images_dir"]),
            ("rows", f"{report['rows']} ({len(report['skipped_rows'])} skipped"
                     f"{': ' if report['skipped_rows'] else ''}{_names(report['skipped_rows'])})"),
            ("images", f"{report['images']} captioned, {report['usable_images']} usable"),
            ("captions per image", f"min {per['min']}, median {per['median']:g}, max {per['max']}"),
            ("missing images", f"{len(report['missing_images'])} "
                               f"{_names(report['missing_images'])}"),
            ("unreadable images", f"{len(report['unreadable_images'])} "
                                  f"{_names(report['unreadable_images'])}"),
            (f"smaller than {report['image_size']} px", f"{len(report['small_images'])} "
                                                       f"{_names(report['small_images'])}"),
            ("empty captions", f"{len(report['empty_captions'])} "
                               f"{_names(report['empty_captions'])}"),
            ("duplicate captions", f"{len(report['duplicate_captions'])} image(s) "
                                   f"{_names(report['duplicate_captions'])}"),
            ("words per caption", f"median {words['median']:g}, 95th percentile {words['p95']}, "
                                  f"max {words['max']}; "
                                  f"{words['over_max_words']} longer than "
                                  f"data.max_words={words['max_words']}"),
            ("vocabulary", f"{vocab['size']} words seen >= {vocab['min_freq']} times "
                           f"(data.min_freq) in train; "
                           f"{100 * vocab['unk_share']:.1f}% of train words become <unk>"),
            ("splits", ", ".join(f"{s} {n}" for s, n in report["splits"].items()) + " images "
                       + ("(the file's own)" if report["splits_from"] in ("file", "shards")
                          else f"(by {report['splits_from']})"))]
    if "shard_problems" in report:
        rows.append(("shard problems", f"{len(report['shard_problems'])} "
                                       f"{_names(report['shard_problems'])}"))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value.rstrip()}" for key, value in rows]
    for name in report["unreadable_images"][:EXAMPLES]:
        lines.append(f"  unreadable: {report['unreadable_reasons'][name]}")
    return "\n".join(lines)
