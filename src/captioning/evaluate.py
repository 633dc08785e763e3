"""Scoring a checkpoint on a held-out split: caption every image, then corpus metrics over them all.

The metrics are coco-caption's (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; see `metrics.py`), so a Flickr30k
run can be set beside published numbers; Shapes runs add the exact-match accuracy of their ground truth.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from .captioner import Captioner
from .checkpoint import checkpoint_path, write_atomic
from .config import Config, ConfigError, from_dict, to_dict
from .data import load_splits, read_corpus
from .env import collect_env
from .metrics import METRICS, score_captions
from .shapes import GROUND_TRUTH, accuracy, load_ground_truth

log = logging.getLogger(__name__)


def _run_env(checkpoint: str | Path) -> dict | None:
    """The env.json of the run the checkpoint comes from (beside it), if there is one."""
    path = Path(checkpoint).parent / "env.json"
    return json.loads(path.read_text()) if path.is_file() else None


def split_names(checkpoint: str | Path, run_dir: str | Path, split: str) -> list[str]:
    """The image names of `split`, from the splits.json beside the checkpoint (or in the run dir)."""
    for folder in (Path(checkpoint).parent, Path(run_dir)):
        if (folder / "splits.json").is_file():
            splits = load_splits(folder / "splits.json")
            if split not in splits:
                raise ValueError(f"{folder / 'splits.json'} has no split {split!r} (has {list(splits)})")
            return splits[split]
    raise FileNotFoundError(f"no splits.json beside {checkpoint} or in {run_dir}")


def predict(captioner: Captioner, images_dir: Path, names: list[str], beam_size: int = 1, batch_size: int = 32,
            progress: bool = True) -> dict[str, str]:
    """Caption every named image; a file that cannot be read is reported and left out."""
    predictions = {}
    for start in tqdm(range(0, len(names), batch_size), desc="captioning", disable=not progress, leave=False):
        chunk = names[start:start + batch_size]
        for name, result in zip(chunk, captioner.caption([images_dir / n for n in chunk], beam_size=beam_size,
                                                         batch_size=batch_size)):
            if result.ok:
                predictions[name] = result.caption
            else:
                log.warning("%s", result.error)
    return predictions


def evaluate(checkpoint: str | Path, split: str = "test", beam_size: int = 1, out: str | Path | None = None,
             device=None, precision: str | None = None, progress: bool = True, java: bool | None = None,
             overrides: list[str] = ()) -> dict:
    """{"metrics": {...}, "predictions": [{"image", "caption"}], "references": {image: [captions]}, "notes": [...],
    "env": {...}, "train_env": {...}}.

    Metrics: `images` (how many were captioned), BLEU-1..4, METEOR, ROUGE-L, CIDEr over the whole split
    at once, and `shapes_accuracy` when the data set is Shapes (its ground truth lies beside the
    captions). Without Java (java=False, or none installed) METEOR is None and `notes` says why.
    The data paths come from the checkpoint's config; `overrides` (data keys only, e.g.
    ["data.images=/new/place"]) point it at data that moved. `precision` defaults to the run's
    train.precision, the one its validation scores were computed at. `env` is this evaluation's
    environment (env.py), `train_env` the run's env.json when there is one.
    """
    checkpoint = checkpoint_path(checkpoint)
    captioner = Captioner.from_checkpoint(checkpoint, device=device, precision=precision)
    cfg = captioner.cfg = data_overrides(captioner.cfg, overrides, checkpoint)
    corpus = _read_data(cfg, checkpoint)
    names = [n for n in split_names(checkpoint, cfg.run_dir, split) if n in corpus.captions]
    if not names:
        raise ValueError(f"the {split} split of {checkpoint} holds no image found in {cfg.data.images}")
    predictions = predict(captioner, corpus.images_dir, names, beam_size, progress=progress)
    if not predictions:
        raise ValueError(f"no image of the {split} split could be read from {corpus.images_dir}")
    references = {n: corpus.captions[n] for n in predictions}
    scores, notes = score_captions(predictions, references, METRICS, java=java)
    metrics = {"images": len(predictions), **scores}
    truth_dir = Path(cfg.data.captions).expanduser().parent
    if (truth_dir / GROUND_TRUTH).is_file():
        metrics["shapes_accuracy"] = accuracy(predictions, load_ground_truth(truth_dir))
    report = {"metrics": metrics,
              "predictions": [{"image": n, "caption": c} for n, c in predictions.items()],
              "references": references, "notes": notes,
              "env": collect_env(captioner.device, captioner.precision), "train_env": _run_env(checkpoint)}
    if out is not None:
        write_atomic(out, lambda f: json.dump(report, f, indent=1), "w")
    return report


def data_overrides(cfg: Config, overrides: list[str], checkpoint: Path) -> Config:
    """The checkpoint's config with `overrides` of its data keys (the model and its training are the checkpoint's)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith("data."):
            raise ConfigError(f"evaluate --set takes data keys only (data.images, data.captions, ...), got {key!r}: "
                              f"the model and how it was trained come from {checkpoint}")
    return from_dict(to_dict(cfg), list(overrides), check_paths=False) if overrides else cfg


def _read_data(cfg: Config, checkpoint: Path):
    try:
        return read_corpus(cfg, generate=False)
    except (ConfigError, FileNotFoundError) as e:
        raise type(e)(f"{e}. The data paths come from {checkpoint}'s config: if the data moved, say where it is "
                      "now with --set data.images=FOLDER --set data.captions=FILE") from None
