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
from .data import load_splits, read_corpus
from .metrics import METRICS, score_captions
from .shapes import GROUND_TRUTH, accuracy, load_ground_truth

log = logging.getLogger(__name__)


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
             device=None, precision: str = "auto", progress: bool = True, java: bool | None = None) -> dict:
    """{"metrics": {...}, "predictions": [{"image", "caption"}], "references": {image: [captions]}, "notes": [...]}.

    Metrics: `images` (how many were captioned), BLEU-1..4, METEOR, ROUGE-L, CIDEr over the whole split
    at once, and `shapes_accuracy` when the data set is Shapes (its ground truth lies beside the
    captions). Without Java (java=False, or none installed) METEOR is None and `notes` says why.
    """
    captioner = Captioner.from_checkpoint(checkpoint, device=device, precision=precision)
    cfg = captioner.cfg
    corpus = read_corpus(cfg)
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
              "references": references, "notes": notes}
    if out is not None:
        Path(out).write_text(json.dumps(report, indent=1))
    return report
