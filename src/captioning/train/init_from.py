"""Where a run's model comes from: train.init_from (another run's checkpoint, checked against the
config) or a fresh build, with a checkpoint's weights when there is one."""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..config import Config, ConfigError, from_dict, to_dict
from ..data.corpus import load_splits
from ..data.vocab import Vocabulary
from ..model.caption_model import CaptionModel, build_model
from ..model.checkpoint import checkpoint_path, read_checkpoint

log = logging.getLogger(__name__)


# model keys a run started from a checkpoint may change: its weights come from the checkpoint
INIT_FREE_MODEL_KEYS = ("pretrained", "dropout", "train_backbone")


def read_init(cfg: Config) -> tuple[dict, Vocabulary, dict | None]:
    """train.init_from (a checkpoint, or a run directory: its best.pt): its checkpoint, vocabulary
    and run's splits (None, with a warning, without a splits.json beside it: splits are made anew).
    The config's model and image size must be the checkpoint's: a differing key is an error."""
    try:
        path = checkpoint_path(cfg.train.init_from)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'train.init_from': {e}") from None
    ckpt = read_checkpoint(path)
    saved = from_dict(ckpt["config"], check_paths=False, source=str(path))
    pairs = ([(f"model.{k}", getattr(cfg.model, k), v) for k, v in to_dict(saved.model).items()
              if k not in INIT_FREE_MODEL_KEYS]
             + [("data.image_size", cfg.data.image_size, saved.data.image_size)])
    for key, ours, theirs in pairs:
        if ours != theirs:
            raise ConfigError(f"config key '{key}': {ours!r}, but train.init_from={path} "
                              f"was trained with {theirs!r}: the model starts from its weights, "
                              f"so set {key}={theirs}")
    if not (path.parent / "splits.json").is_file():
        log.warning("no splits.json beside %s: the splits are made from data.split_seed; "
                    "if that run split its images otherwise, this run's val and test images "
                    "may be some it trained on", path)
        return ckpt, Vocabulary.from_list(ckpt["vocab"]), None
    return ckpt, Vocabulary.from_list(ckpt["vocab"]), load_splits(path.parent / "splits.json")


def build_run_model(cfg: Config, vocab: Vocabulary, weights: dict | None,
           device: torch.device) -> CaptionModel:
    """The run's model, with a checkpoint's weights when given (resume, train.init_from): loaded
    before the feature cache checks the encoder's, and built without torchvision's (no download)."""
    model = build_model(replace(cfg.model, pretrained=cfg.model.pretrained and weights is None),
                        len(vocab), vocab.pad)
    if weights is not None:
        model.load_state_dict(weights["model"])
    return model.to(device)
