"""One config dataclass tree: the single source of truth for a run.

YAML files and ``--set key=value`` overrides only fill it in; ``asdict(cfg)``
goes into the checkpoint and the run directory. Every key is validated on load
and an error names the key, before anything heavy (data, model) starts.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_checks import (  # noqa: F401 (the choices are config's names too)
    BASELINES,
    DATA_FORMATS,
    LOGS,
    MAX_TOKENS,
    MONITORS,
    OBJECTIVES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    validate_data_model,
    validate_objective,
    validate_shards,
    validate_train,
)

log = logging.getLogger(__name__)

# old key -> new key: configs and checkpoints written with the old name still load, with a warning
RENAMED = {"data.max_len": "data.max_words", "model.max_len": "model.max_tokens"}


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


class EnvironmentProblem(RuntimeError):
    """Something outside the config is missing (weights that cannot be downloaded, ...); the message
    says what to do. The CLI shows it as one line."""


@dataclass
class DataConfig:
    format: str = "auto"             # auto (told from data.captions, logged) | flickr30k | karpathy
                                     # | coco | csv | jsonl | shapes (generated when missing)
    images: str = "data/flickr30k/flickr30k_images"
    captions: str = "data/flickr30k/results.csv"
    image_size: int = 224
    min_freq: int = 5                # words seen fewer times become <unk>
    max_words: int = 40              # words kept per caption (longer ones are cut)
    val_fraction: float = 0.05       # of images; ignored for karpathy (its own split)
    test_fraction: float = 0.05
    split_seed: int = 0              # seeds the image-level split; `seed` seeds init and data order
    shapes_images: int = 3000        # format shapes: images to generate when the set is missing
    features_dir: str = "data/features"  # train.cache_features: the frozen encoder's feature cache
    shards: str = ""                 # format webdataset: the `shards` command's folder (or its
                                     # index.json), or a brace pattern of local paths or http(s)
                                     # URLs: DIR/{train,val}-{000000..000009}.tar
    shuffle_buffer: int = 1000       # format webdataset: samples shuffled together as they stream


@dataclass
class ModelConfig:
    backbone: str = "resnet152"      # any torchvision ResNet
    pretrained: bool = True          # torchvision's ImageNet weights (downloads once)
    train_backbone: bool = False     # frozen by default
    backbone_stages: int = 4         # stages kept: 4 = all (stride 32), 3 = stride 16, 2 = stride 8
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    max_tokens: int = 64             # longest token sequence (with <bos>/<eos>) the model accepts


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32             # images per step (each with all of its captions)
    lr: float = 5e-5
    optimizer: str = "adam"          # adam (the reference's) | adamw (decoupled weight decay)
    weight_decay: float = 0.0        # adamw: decoupled; adam: L2 added to the gradient
    scheduler: str = "exponential"   # exponential: lr * gamma ** epoch (the reference's) | constant
                                     # | cosine: to 0 over all steps
                                     # | plateau: lr * gamma after each evaluation with no gain
    gamma: float = 0.95              # exponential: the factor per epoch; plateau: per evaluation
    warmup_steps: int = 0            # linear warmup: step k (from 1) at k / warmup_steps of lr
    label_smoothing: float = 0.0     # of the cross-entropy loss
    patience: int = 3                # evaluations without improvement before stopping; 0 = never
    monitor: str = "val_loss"        # picks best.pt, stops early: val_loss | cider (val CIDEr)
    eval_every: int = 1              # monitor=cider: caption val every N epochs (and the last)
    eval_images: int = 0             # monitor=cider: val images captioned (the first N); 0 = all
    precision: str = "auto"          # auto | fp32 | bf16 | fp16
    cache_features: bool = False     # frozen encoder: run once per image into an fp16 cache
    num_workers: int = 4
    save_every: int = 0              # also write last.pt every N steps mid-epoch; 0 = epoch ends
    grad_clip: float = 0.0           # max gradient norm; 0 = off
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    objective: str = "xe"            # xe: cross-entropy | scst: self-critical, CIDEr-D (see scst:)
    init_from: str = ""              # a checkpoint (model, vocabulary, splits) to start from:
                                     # scst's xe best.pt
    eval_beam: int = 1               # monitor=cider: beam size of the val captions (1 = greedy)
    log: str = "none"                # none | tensorboard: event files in run_dir, as it trains


@dataclass
class ScstConfig:
    """train.objective=scst: self-critical sequence training (scst.py)."""
    samples: int = 5                 # captions sampled per image and step
    baseline: str = "mean"           # mean: of the image's other samples (Luo 2020)
                                     # | greedy: its greedy caption's
    max_words: int = 20              # words per sampled caption


@dataclass
class Config:
    run_dir: str = "runs/flickr30k"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)


def _fill(cls, values: dict, prefix: str):
    """Build dataclass `cls` from `values`, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}' "
                              f"(known: {', '.join(prefix + k for k in fields)})")
        default = (fields[key].default_factory() if fields[key].default is dataclasses.MISSING
                   else fields[key].default)
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
    d = cfg.data

    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ConfigError(f"config key '{key}': {why}")

    validate_data_model(cfg, need)
    validate_train(cfg, need)
    need(bool(cfg.run_dir), "run_dir", "must not be empty")
    validate_objective(cfg, need)
    validate_shards(cfg, need, check_paths)
    # format shapes generates its data when missing; webdataset reads data.shards; the rest find it
    if check_paths and d.format not in ("shapes", "webdataset"):
        need(Path(d.images).expanduser().is_dir(), "data.images",
             f"folder {d.images!r} does not exist")
        captions = Path(d.captions).expanduser()   # coco, auto: a file or COCO's annotations/
        need(captions.exists() if d.format in ("coco", "auto") else captions.is_file(),
             "data.captions",
             f"{'' if d.format in ('coco', 'auto') else 'file '}{d.captions!r} does not exist")
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


def rename_old_keys(raw: dict, source: str = "config") -> dict:
    """Move keys renamed since (RENAMED) to their new names, in place, with one warning each."""
    for old, new in RENAMED.items():
        (section, old_key), (_, new_key) = old.split("."), new.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and old_key in node:
            value = node.pop(old_key)
            if new_key in node:
                raise ConfigError(f"{source}: both '{old}' (its old name) and '{new}' are set: "
                                  f"keep '{new}'")
            node[new_key] = value
            log.warning("%s: config key '%s' is now '%s' (read as such)", source, old, new)
    return raw


def _rename_override(item: str) -> str:
    key, sep, value = item.partition("=")
    if key.strip() in RENAMED:
        log.warning("--set: config key '%s' is now '%s' (read as such)", key.strip(),
                    RENAMED[key.strip()])
        return f"{RENAMED[key.strip()]}{sep}{value}"
    return item


def from_dict(raw: dict, overrides: list[str] = (), check_paths: bool = True,
              source: str = "config") -> Config:
    """A validated Config from raw keys (a YAML file's, a checkpoint's) and ``key=value``
    overrides."""
    raw = rename_old_keys(copy.deepcopy(raw or {}), source)
    raw = _merge(raw, [_rename_override(item) for item in overrides])
    return validate(_fill(Config, raw, ""), check_paths=check_paths)


def _deep_update(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys laid over it, section by section."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = (_deep_update(out[key], value)
                    if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else copy.deepcopy(value))
    return out


def read_yaml_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file's raw keys, laid over those of its `base: other.yaml` (relative to it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        cycle = " -> ".join(map(str, _seen + (path.resolve(),)))
        raise ConfigError(f"{path}: 'base' files form a cycle: {cycle}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 ({e.reason})") from None
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    raw = rename_old_keys(raw, str(path))
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path to another config file, got {base!r}")
    base_path = path.parent / Path(base).expanduser()
    if not base_path.is_file():
        raise ConfigError(f"{path}: its base config {str(base_path)!r} does not exist "
                          f"('base' is relative to {path})")
    return _deep_update(read_yaml_config(base_path, _seen + (path.resolve(),)), raw)


def load_config(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read a YAML config (and its `base:` chain), apply ``key=value`` overrides, validate."""
    return from_dict(read_yaml_config(path), overrides, check_paths)


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def flatten(mapping: dict, prefix: str = "") -> dict:
    """{'train': {'epochs': 6}, 'data.min_freq': 1} -> {'train.epochs': 6, 'data.min_freq': 1}."""
    flat = {}
    for key, value in mapping.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                    else {f"{prefix}{key}": value})
    return flat


PATH_KEYS = ("run_dir", "data.images", "data.captions", "data.features_dir", "data.shards",
             "train.init_from")


def absolute_paths(cfg: Config, base: str | Path | None = None) -> tuple[Config, dict[str, str]]:
    """A copy of cfg with its relative paths made absolute against `base` (default: the working
    folder), and {key: path as given} of those it changed: a run directory then works anywhere."""
    cfg, given = copy.deepcopy(cfg), {}
    base = Path(base or Path.cwd())
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, name)
        if not value or "://" in value:    # an optional path left empty, or a URL
            continue
        parts = [Path(p).expanduser() for p in value.split("::")]   # data.shards: a::b patterns
        if not all(p.is_absolute() for p in parts):
            setattr(owner, name, "::".join(os.path.normpath(base / p) for p in parts))
            given[key] = value
    return cfg, given


def save_config(cfg: Config, path: str | Path, given: dict[str, str] | None = None) -> None:
    """A run's config.yaml; `given`: the paths as written before made absolute, as a comment."""
    with open(path, "w") as f:
        if given:
            f.write(f"# relative paths were made absolute against {Path.cwd()}; as given:\n")
            f.writelines(f"#   {key}: {value}\n" for key, value in given.items())
        yaml.safe_dump(asdict(cfg), f, sort_keys=False)
