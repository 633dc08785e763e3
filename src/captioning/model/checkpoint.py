"""One-file checkpoints: plain dicts of lists, numbers, strings and tensors.

They load with ``torch.load(path, weights_only=True)``: the vocabulary is a
list of tokens and the config a dict, nothing is pickled. Writes are atomic
(temporary file in the same folder, fsync, os.replace), so a crash never
leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import logging
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..config import Config, from_dict, to_dict
from ..data.vocab import Vocabulary
from ..files import write_atomic
from .caption_model import CaptionModel, build_model

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def save_atomic(obj: dict, path: str | Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def model_checkpoint(model: CaptionModel, cfg: Config, vocab: Vocabulary, **extra) -> dict:
    """What `load_checkpoint` needs to rebuild the model from the file alone."""
    return {"format_version": FORMAT_VERSION, "config": to_dict(cfg), "vocab": vocab.to_list(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


class CheckpointError(ValueError):
    """A file that is not a captioning checkpoint (or not one this version reads)."""


def checkpoint_path(path: str | Path) -> Path:
    """`path`, or the best.pt inside it when it is a run directory (saying so)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "best.pt").is_file():
            log.warning("%s is a run directory: using %s", path, path / "best.pt")
            return path / "best.pt"
        raise FileNotFoundError(f"{path} is a directory, not a checkpoint, and holds no best.pt: "
                                "pass a checkpoint file, e.g. RUN_DIR/best.pt or "
                                "RUN_DIR/last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint's dict; CheckpointError naming the file when it is not one (empty, truncated,
    other data)."""
    path = checkpoint_path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"not a captioning checkpoint: {path} (an empty file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # torch's own message would advise weights_only=False: unsafe
        raise CheckpointError(f"not a captioning checkpoint: {path} "
                              f"({_why_unreadable(path, e)})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"not a captioning checkpoint: {path} "
                              "(a PyTorch file without this project's keys)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: a captioning checkpoint of format version "
                              f"{ckpt['format_version']}; this version reads {FORMAT_VERSION}")
    return ckpt


def _why_unreadable(path: Path, error: Exception) -> str:
    if isinstance(error, (PermissionError, IsADirectoryError)):
        return f"cannot be read: {error.strerror or error}"
    if not zipfile.is_zipfile(path):       # torch.save writes a zip archive
        return "not a file torch.save wrote: a CSV, an image or a truncated download?"
    if "weights only load failed" in str(error).lower():
        return ("it holds objects other than tensors, lists, dicts and numbers, "
                "which could run code when loaded")
    return "a damaged or truncated PyTorch file, or a zip archive of something else"


def load_checkpoint(path: str | Path, device="cpu") -> tuple[CaptionModel, Vocabulary, Config]:
    """Rebuild (model in eval mode, vocabulary, config) from one checkpoint file."""
    ckpt = read_checkpoint(path)
    cfg = from_dict(ckpt["config"], check_paths=False, source=str(path))
    cfg.model.pretrained = False  # the weights come from the file: never download
    vocab = Vocabulary.from_list(ckpt["vocab"])
    model = build_model(cfg.model, len(vocab), vocab.pad)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:                 # torch's message: a line per mismatched tensor
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{path}: its weights do not fit the model its config describes "
                         f"({first}); was the file edited, or written elsewhere?") from None
    return model.to(device).eval(), vocab, cfg


# RNG states as plain values, so that they survive weights_only loading

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
