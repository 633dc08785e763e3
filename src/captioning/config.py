"""One config dataclass tree: the single source of truth for a run.

YAML files and ``--set key=value`` overrides only fill it in; ``asdict(cfg)``
goes into the checkpoint and the run directory. Every key is validated on load
and an error names the key, before anything heavy (data, model) starts.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_FORMATS = ("flickr30k", "karpathy", "csv", "shapes")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MONITORS = ("val_loss", "cider")


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


@dataclass
class DataConfig:
    format: str = "flickr30k"        # flickr30k | karpathy | csv | shapes
    images: str = "data/flickr30k/flickr30k_images"
    captions: str = "data/flickr30k/results.csv"
    image_size: int = 224
    min_freq: int = 5                # words seen fewer times become <unk>
    max_len: int = 40                # words kept per caption (longer ones are cut)
    val_fraction: float = 0.05       # of images; ignored for karpathy (its own split)
    test_fraction: float = 0.05
    shapes_images: int = 3000        # format shapes: images to generate when the set is missing
    features_dir: str = "data/features"  # train.cache_features: where the frozen encoder's features are cached


@dataclass
class ModelConfig:
    backbone: str = "resnet152"      # any torchvision ResNet
    pretrained: bool = True          # torchvision's ImageNet weights (downloads once)
    train_backbone: bool = False     # frozen by default
    backbone_stages: int = 4         # ResNet stages kept: 4 = all (stride 32), 3 = stride 16, 2 = stride 8
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    max_len: int = 64                # longest token sequence (with <bos>/<eos>) the model accepts


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32             # images per step (each with all of its captions)
    lr: float = 5e-5
    gamma: float = 0.95              # ExponentialLR, stepped once per epoch
    patience: int = 3                # evaluations without a better monitored value before stopping; 0 = never
    monitor: str = "val_loss"        # what picks best.pt and stops early: val_loss (lower) | cider (val CIDEr, higher)
    eval_every: int = 1              # monitor=cider: caption the val split every this many epochs (and the last)
    eval_images: int = 0             # monitor=cider: val images captioned (the first N); 0 = all
    precision: str = "auto"          # auto | fp32 | bf16 | fp16
    cache_features: bool = False     # frozen encoder: run it once per image into a fp16 cache (features.py)
    num_workers: int = 4
    save_every: int = 0              # also write last.pt every this many steps, mid-epoch (0 = at epoch ends only)
    grad_clip: float = 0.0           # max gradient norm; 0 = off
    device: str = "auto"             # auto | cpu | cuda | cuda:N


@dataclass
class Config:
    run_dir: str = "runs/flickr30k"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _fill(cls, values: dict, prefix: str):
    """Build dataclass `cls` from `values`, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}' (known: {', '.join(prefix + k for k in fields)})")
        default = fields[key].default_factory() if fields[key].default is dataclasses.MISSING else fields[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _fill(type(default), value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, type(default), name)
    return cls(**kwargs)


def _coerce(value: Any, kind: type, name: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 5e-5 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{name}' must be {kind.__name__}, got {value!r}")
    return value


def validate(cfg: Config, check_paths: bool = True) -> Config:
    """Check values and their relations; raise ConfigError naming the key."""
    d, m, t = cfg.data, cfg.model, cfg.train

    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ConfigError(f"config key '{key}': {why}")

    need(d.format in DATA_FORMATS, "data.format", f"must be one of {DATA_FORMATS}, got {d.format!r}")
    need(d.image_size >= 32, "data.image_size", f"must be at least 32 (the ResNet stride), got {d.image_size}")
    need(d.min_freq >= 1, "data.min_freq", f"must be >= 1, got {d.min_freq}")
    need(d.max_len >= 1, "data.max_len", f"must be >= 1, got {d.max_len}")
    need(m.max_len >= d.max_len + 2, "model.max_len", f"must be >= data.max_len + 2 ({d.max_len + 2}), got {m.max_len}")
    for key in ("val_fraction", "test_fraction"):
        need(0.0 <= getattr(d, key) < 0.5, f"data.{key}", f"must be in [0, 0.5), got {getattr(d, key)}")
    need(d.shapes_images >= 10, "data.shapes_images", f"must be >= 10, got {d.shapes_images}")
    need(m.backbone.startswith("resnet") or m.backbone.startswith("wide_resnet") or m.backbone.startswith("resnext"),
         "model.backbone", f"must name a torchvision ResNet (resnet18 ... resnet152, resnext*, wide_resnet*), got {m.backbone!r}")
    need(1 <= m.backbone_stages <= 4, "model.backbone_stages", f"must be 1 to 4, got {m.backbone_stages}")
    for key in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "dim_feedforward"):
        need(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    need(m.d_model % m.num_heads == 0, "model.d_model",
         f"{m.d_model} is not divisible by model.num_heads={m.num_heads}")
    need(m.d_model % 4 == 0, "model.d_model", f"must be a multiple of 4 (2-D positional encoding), got {m.d_model}")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    for key in ("epochs", "batch_size"):
        need(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(0 < t.gamma <= 1, "train.gamma", f"must be in (0, 1], got {t.gamma}")
    need(t.patience >= 0, "train.patience", f"must be >= 0, got {t.patience}")
    need(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {t.precision!r}")
    need(t.monitor in MONITORS, "train.monitor", f"must be one of {MONITORS}, got {t.monitor!r}")
    need(t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}")
    need(t.eval_images >= 0, "train.eval_images", f"must be >= 0, got {t.eval_images}")
    need(not (t.cache_features and m.train_backbone), "train.cache_features",
         "needs a frozen encoder (model.train_backbone: false): a trained backbone's features change every step")
    need(t.save_every >= 0, "train.save_every", f"must be >= 0, got {t.save_every}")
    need(t.num_workers >= 0, "train.num_workers", f"must be >= 0, got {t.num_workers}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         f"must be auto, cpu or cuda[:N], got {t.device!r}")
    need(bool(cfg.run_dir), "run_dir", "must not be empty")
    # format shapes generates its data when missing; every other format must find it
    if check_paths and d.format != "shapes":
        need(Path(d.images).expanduser().is_dir(), "data.images", f"folder {d.images!r} does not exist")
        need(Path(d.captions).expanduser().is_file(), "data.captions", f"file {d.captions!r} does not exist")
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _merge(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[path[-1]] = value
    return raw


def from_dict(raw: dict, overrides: list[str] = (), check_paths: bool = True) -> Config:
    raw = _merge(copy.deepcopy(raw or {}), list(overrides))
    return validate(_fill(Config, raw, ""), check_paths=check_paths)


def load_config(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return from_dict(raw, overrides, check_paths)


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(asdict(cfg), f, sort_keys=False)
