"""Scoring a checkpoint on a held-out split: caption every image, then corpus metrics over them
all; and scoring any model's predictions (`score`) the same way, against references in any format
the readers take.

The metrics are coco-caption's (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; see `metrics.py`), so a
Flickr30k run can be set beside published numbers; Shapes runs add the exact-match accuracy of their
ground truth.
"""
from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from ..captioner import Captioner, CaptionResult
from ..config import Config, ConfigError, from_dict, to_dict
from ..data.check import require_folder
from ..data.corpus import load_splits, read_corpus, skipped_message
from ..data.readers import read_captions
from ..data.readers.table import csv_rows, jsonl_rows
from ..data.shapes import GROUND_TRUTH, accuracy, load_ground_truth, pointing_game
from ..data.shards import find_shards, iter_samples
from ..env import collect_env
from ..files import write_atomic
from ..model.checkpoint import checkpoint_path
from .diversity import diversity
from .metrics import METRICS, score_captions

log = logging.getLogger(__name__)


def _run_env(checkpoint: str | Path) -> dict | None:
    """The env.json of the run the checkpoint comes from (beside it), if there is one."""
    path = Path(checkpoint).parent / "env.json"
    return json.loads(path.read_text()) if path.is_file() else None


def split_names(checkpoint: str | Path, run_dir: str | Path, split: str) -> list[str]:
    """The image names of `split`, from the splits.json beside the checkpoint (or in the run
    dir)."""
    for folder in (Path(checkpoint).parent, Path(run_dir)):
        if (folder / "splits.json").is_file():
            splits = load_splits(folder / "splits.json")
            if split not in splits:
                raise ValueError(f"{folder / 'splits.json'} has no split {split!r} "
                                 f"(has {list(splits)})")
            return splits[split]
    raise FileNotFoundError(f"no splits.json beside {checkpoint} or in {run_dir}")


def predict(captioner: Captioner, images_dir: Path, names: list[str], batch_size: int = 32,
            progress: bool = True, **options) -> dict[str, CaptionResult]:
    """Caption every named image (options: Captioner.caption's); a file that cannot be read is
    reported and left out."""
    return predict_inputs(captioner, [(n, images_dir / n) for n in names], len(names),
                          batch_size=batch_size, progress=progress, **options)


def predict_inputs(captioner: Captioner, inputs: Iterable[tuple[str, object]], total: int | None,
                   batch_size: int = 32, progress: bool = True,
                   **options) -> dict[str, CaptionResult]:
    """predict's results of (name, path or image bytes) pairs, read as they are captioned."""
    results, inputs = {}, iter(inputs)
    bar = tqdm(total=total, desc="captioning", disable=not progress, leave=False)
    while chunk := list(itertools.islice(inputs, batch_size)):
        found = captioner.caption([image for _, image in chunk], batch_size=batch_size, **options)
        for (name, _), result in zip(chunk, found):
            if result.ok:
                results[name] = result
            else:
                log.warning("%s", result.error if name in result.error
                            else f"{name}: {result.error}")
        bar.update(len(chunk))
    bar.close()
    return results


def evaluate(checkpoint: str | Path, split: str = "test", beam_size: int = 1,
             out: str | Path | None = None, device=None, precision: str | None = None,
             progress: bool = True, java: bool | None = None, overrides: list[str] = (),
             engine: str = "auto", **options) -> dict:
    """{"metrics": {...}, "predictions": [{"image", "caption"}], "references": {image: [captions]},
    "notes": [...], "env": {...}, "train_env": {...}}.

    Metrics: `images` (how many were captioned), BLEU-1..4, METEOR, ROUGE-L, CIDEr over the whole
    split at once, the diversity figures (diversity.py), and on Shapes (ground truth beside the
    captions) `shapes_accuracy` and the pointing game of colour and shape words' attention maps.
    Without Java (java=False, or none installed) METEOR is None and `notes` says why.
    The data paths come from the checkpoint's config; `overrides` (data keys only, e.g.
    ["data.images=/new/place"]) point it at data that moved. A run of data.format webdataset is
    scored on its split's shards (images and references from the samples). `precision` defaults
    to the run's train.precision, the one its validation scores used. `options`:
    Captioner.caption's decoding options; `engine`: Captioner.from_checkpoint's. `env` is this
    evaluation's environment (env.py), `train_env` the run's env.json if any.
    """
    require_folder(out)
    checkpoint = checkpoint_path(checkpoint)
    captioner = Captioner.from_checkpoint(checkpoint, device=device, precision=precision,
                                          engine=engine)
    cfg = captioner.cfg = data_overrides(captioner.cfg, overrides, checkpoint)
    inputs, total, known, training, where = (_shard_split if cfg.data.format == "webdataset"
                                             else _folder_split)(cfg, checkpoint, split)
    truth_dir = Path(cfg.data.captions).expanduser().parent
    shapes = (truth_dir / GROUND_TRUTH).is_file()
    results = predict_inputs(captioner, inputs, total, progress=progress, beam_size=beam_size,
                             **({"attention": True} if shapes else {}) | options)
    if not results:
        raise ValueError(f"no image of the {split} split could be read from {where}")
    predictions = {n: r.caption for n, r in results.items()}
    references = {n: known[n] for n in predictions}
    scores, notes = score_captions(predictions, references, METRICS, java=java)
    metrics = {"images": len(predictions), **scores,
               **diversity(list(predictions.values()), training(),
                           [[c["caption"] for c in r.captions] for r in results.values()])}
    if shapes:
        metrics.update(shapes_metrics(results, load_ground_truth(truth_dir)))
    report = {"metrics": metrics,
              "predictions": [{"image": n, "caption": c} for n, c in predictions.items()],
              "references": references, "notes": notes,
              "env": collect_env(captioner.device, captioner.precision),
              "train_env": _run_env(checkpoint)}
    if out is not None:
        write_atomic(out, lambda f: json.dump(report, f, indent=1), "w")
    return report


def _folder_split(cfg: Config, checkpoint: Path, split: str):
    """(the split's (name, image path) pairs, their count, {name: captions}, a function giving the
    training captions, where the images are) of a data set in a folder."""
    corpus = _read_data(cfg, checkpoint)
    names = [n for n in split_names(checkpoint, cfg.run_dir, split) if n in corpus.captions]
    if not names:
        raise ValueError(f"the {split} split of {checkpoint} holds no image found in "
                         f"{cfg.data.images}")

    def training() -> list[str]:
        return [c for n in split_names(checkpoint, cfg.run_dir, "train")
                for c in corpus.captions.get(n, [])]
    return ([(n, corpus.images_dir / n) for n in names], len(names), corpus.captions, training,
            corpus.images_dir)


def _shard_split(cfg: Config, checkpoint: Path, split: str):
    """_folder_split's of data.format webdataset: the split's shards, streamed (the image bytes
    and captions of the samples splits.json names, all of them when it names none); the dict of
    captions fills as the samples are read, and the training captions are one pass over the
    training shards' samples."""
    try:
        found = find_shards(cfg.data.shards)
    except ConfigError as e:
        raise ConfigError(f"{e}. The data paths come from {checkpoint}'s config: if the shards "
                          "moved, say where they are now with --set data.shards=...") from None
    if not found.shards.get(split):
        raise ValueError(f"{cfg.data.shards} has no {split} shard (expected {split}-NNNNNN.tar): "
                         "write the shards with a test split (data.test_fraction > 0), or "
                         "evaluate --split val")
    wanted, known = set(split_names(checkpoint, cfg.run_dir, split)), {}

    def inputs():
        for url in found.shards[split]:
            for key, data, _, meta in iter_samples(url):
                name = meta.get("name") or key
                if not wanted or name in wanted:
                    known[name] = [c for c in meta.get("captions", []) if c.strip()]
                    yield name, data

    def training() -> list[str]:
        return [c for url in found.shards["train"] for *_, meta in iter_samples(url)
                for c in meta.get("captions", [])]
    return (inputs(), len(wanted) or sum(found.counts[split]), known, training,
            f"the shards of {cfg.data.shards}")


def shapes_metrics(results: dict[str, CaptionResult], truth: dict[str, list[dict]]) -> dict:
    """Shapes accuracy, and the pointing game of the words' attention maps against its chance
    level."""
    out = {"shapes_accuracy": accuracy({n: r.caption for n, r in results.items()}, truth)}
    points = [p for n, r in results.items() if r.attention is not None
              for p in pointing_game(r.words, r.attention, truth[n])]
    if points:
        out["pointing_accuracy"] = sum(hit for hit, _ in points) / len(points)
        out["pointing_chance"] = sum(chance for _, chance in points) / len(points)
        out["pointing_words"] = len(points)
    return out


def data_overrides(cfg: Config, overrides: list[str], checkpoint: Path) -> Config:
    """The checkpoint's config with `overrides` of its data keys (the model and its training stay
    the checkpoint's)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith("data."):
            raise ConfigError("evaluate --set takes data keys only "
                              f"(data.images, data.captions, ...), got {key!r}: "
                              f"the model and how it was trained come from {checkpoint}")
    return from_dict(to_dict(cfg), list(overrides), check_paths=False) if overrides else cfg


def _read_data(cfg: Config, checkpoint: Path):
    try:
        return read_corpus(cfg, generate=False)
    except (ConfigError, FileNotFoundError) as e:
        raise type(e)(f"{e}. The data paths come from {checkpoint}'s config: if the data moved, "
                      "say where it is now with --set data.images=FOLDER "
                      "--set data.captions=FILE") from None


# ---------------------------------------------------------------- scoring any model's predictions

SCALE = ("coco-caption's 0-1 scale (CIDEr-D 0 to ~3, at most 10); papers print each x100. "
         "Corpus-level, as coco-caption computes them: over the whole set at once (BLEU and METEOR "
         "from pooled counts, ROUGE-L and CIDEr-D averaged over images, CIDEr-D's document "
         "frequencies from every reference scored)")


def _prediction_rows(path: Path):
    """(where, row) of a predictions file, whichever of the accepted layouts it is."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return jsonl_rows(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return csv_rows(path)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return jsonl_rows(path) if text.lstrip().startswith("{") else csv_rows(path)
    if isinstance(data, dict) and isinstance(data.get("predictions"), list):
        data = data["predictions"]                                 # an `evaluate --out` report
    if isinstance(data, dict):                                     # JSON Lines of one line
        return jsonl_rows(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} "
                         "(COCO's results format)")
    return ((f"[{i}]", row if isinstance(row, dict) else None) for i, row in enumerate(data))


def read_predictions(path: str | Path,
                     ids: dict[int, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """({image: caption}, notes) of a predictions file: JSON Lines of image (or input) and caption,
    as `caption --json` writes them (lines with an error are left out); a CSV with image,caption;
    COCO's results format, a JSON list of {image_id, caption}, the ids mapped to image names through
    `ids`; or an `evaluate --out` report. An image predicted twice is an error naming both rows."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {str(path)!r} does not exist")
    predictions, where_of, failed, unreadable = {}, {}, [], []
    for where, row in _prediction_rows(path):
        row = row or {}
        if "image" not in row and "image_id" in row:
            image_id = (int(row["image_id"]) if str(row["image_id"]).strip().isdigit()
                        else row["image_id"])
            name = (ids or {}).get(image_id, f"image_id {row['image_id']}")
        else:
            name = str(row.get("image") or "").strip()
        if not name or not isinstance(row.get("caption"), str):
            (failed if "error" in row else unreadable).append(where)
            continue
        if name in predictions:
            raise ValueError(f"{path}: image {name!r} has two predictions "
                             f"({where_of[name]} and {where}); keep one caption per image")
        predictions[name], where_of[name] = row["caption"].strip(), where
    notes = []
    if failed:
        notes.append(f"{path}: {len(failed)} input(s) have an error instead of a caption "
                     f"and are left out ({', '.join(failed[:5])})")
    if unreadable:
        notes.append(f"{path}: skipped {len(unreadable)} unreadable row(s) "
                     f"({', '.join(unreadable[:5])}): each "
                     "needs an image (or input, or image_id) and a caption")
    if not predictions:
        raise ValueError(f"{path}: no prediction found: expected JSON Lines of "
                         f"{{\"image\": ..., \"caption\": ...}} (as caption --json writes), "
                         "a CSV with image,caption columns, or COCO's results format "
                         "[{\"image_id\": ..., \"caption\": ...}]")
    return predictions, notes


def match_names(predictions: dict[str, str],
                references: dict[str, list[str]]) -> tuple[dict[str, str], list[str]]:
    """Predictions renamed to the reference image they name when the names differ only in leading
    folders ('/data/coco/val2017/x.jpg' or 'x.jpg' for 'val2017/x.jpg'); an ambiguous or unknown
    name is kept as is."""
    tails: dict[str, str | None] = {}
    for name in references:
        parts = name.split("/")
        for k in range(len(parts)):
            tail = "/".join(parts[k:])
            # None: two references end in this tail
            tails[tail] = name if tails.get(tail, name) == name else None
    matched, renamed = {}, []
    for name, caption in predictions.items():
        target = name
        if name not in references:
            parts = name.replace("\\", "/").split("/")
            target = next((tails[t] for t in ("/".join(parts[k:]) for k in range(len(parts)))
                           if t in tails), None) or name
        if target in matched:
            raise ValueError(f"two predictions name the reference image {target!r} "
                             f"(one of them is {name!r}); keep one caption per image")
        matched[target] = caption
        if target != name:
            renamed.append(f"{name!r} -> {target!r}")
    notes = [f"{len(renamed)} prediction(s) were matched to reference images "
             f"by the end of their path (e.g. {', '.join(renamed[:2])})"] if renamed else []
    return matched, notes


def read_references(path: str | Path, fmt: str = "auto", split: str | None = None,
                    splits_file: str | Path | None = None, split_seed: int = 0,
                    key: str = "data.format") -> tuple[dict[str, list[str]], dict]:
    """({image: captions}, {COCO id: image}) of a captions file in any format the readers take;
    `split` picks the images of one split, from `splits_file` (a run's splits.json) or else from the
    file's own split."""
    found = read_captions(path, fmt, split_seed=split_seed, key=key)
    if found.skipped:
        log.warning("%s", skipped_message(found, Path(path)))
    ids = found.ids or {int(Path(n).stem): n for n in found.captions if Path(n).stem.isdigit()}
    if split is None:
        return found.captions, ids
    splits = load_splits(splits_file) if splits_file else found.splits
    if splits is None:
        raise ValueError(f"{path} (read as {found.format}) carries no split, "
                         f"so --split {split} has nothing to pick from: "
                         "leave --split out to score against every image it holds, "
                         "or add --splits RUN_DIR/splits.json")
    if split not in splits:
        raise ValueError(f"{splits_file or path} has no split {split!r} "
                         f"(it has {', '.join(splits)})")
    names = set(splits[split])
    return {n: c for n, c in found.captions.items() if n in names}, ids


def score(predictions: str | Path, references: str | Path, *, fmt: str = "auto",
          split: str | None = None, splits_file: str | Path | None = None, split_seed: int = 0,
          out: str | Path | None = None, java: bool | None = None, key: str = "fmt") -> dict:
    """Score any model's predictions against references, as `evaluate` scores a checkpoint's: the
    same report ({"metrics", "predictions", "references", "notes"}, plus "unscored", "warnings" and
    "scale").

    Only the images with both a prediction and references are scored; the others are named in
    "unscored" and warned about. See `read_predictions` for the prediction layouts,
    `read_references` for `fmt`, `split` and `splits_file`; `key`: the name of `fmt` in errors.
    """
    require_folder(out)
    refs, ids = read_references(references, fmt, split, splits_file, split_seed, key)
    preds, warnings = read_predictions(predictions, ids)
    preds, renamed = match_names(preds, refs)
    extra, unpredicted = [n for n in preds if n not in refs], [n for n in refs if n not in preds]
    where = f"{references}" + (f" ({split} split)" if split else "")
    if extra:
        warnings.append(f"{len(extra)} image(s) have a prediction but no references in {where}, "
                        f"and are not scored (e.g. {', '.join(extra[:3])})")
    if unpredicted:
        warnings.append(f"{len(unpredicted)} image(s) of {where} have no prediction, "
                        f"and are not scored (e.g. {', '.join(unpredicted[:3])})")
    if empty := [n for n in preds if n in refs and not preds[n].strip()]:
        warnings.append(f"{len(empty)} prediction(s) in {predictions} are empty captions, scored "
                        f"as they are (e.g. {', '.join(empty[:3])})")
    for warning in warnings:
        log.warning("%s", warning)
    common = [n for n in preds if n in refs]
    if not common:
        raise ValueError(f"no image of {predictions} is among the references in {where} "
                         f"(predictions name e.g. {extra[:2]}, references {list(refs)[:2]}): "
                         "the names must match (paths relative to data.images), "
                         "or give COCO image_ids with COCO references")
    scores, notes = score_captions({n: preds[n] for n in common}, {n: refs[n] for n in common},
                                   METRICS, java=java)
    report = {"metrics": {"images": len(common), **scores},
              "predictions": [{"image": n, "caption": preds[n]} for n in common],
              "references": {n: refs[n] for n in common}, "notes": warnings + renamed + notes,
              "warnings": warnings,
              "unscored": {"predictions_without_references": extra,
                           "references_without_predictions": unpredicted},
              "scale": SCALE}
    if out is not None:
        write_atomic(out, lambda f: json.dump(report, f, indent=1), "w")
    return report


def format_scores(report: dict) -> str:
    """A score report's metrics as a table: coco-caption's 0-1 value, and x100 as papers print
    them."""
    lines = [f"{report['metrics']['images']} images scored; {report['scale']}.", "",
             f"{'metric':<8}  {'0-1':>7}  {'x100':>6}"]
    for key in METRICS:
        value = report["metrics"].get(key)
        cells = ((f"{'n/a':>7}", f"{'n/a':>6}") if value is None
                 else (f"{value:7.4f}", f"{100 * value:6.1f}"))
        lines.append(f"{key:<8}  {cells[0]}  {cells[1]}")
    return "\n".join(lines)
