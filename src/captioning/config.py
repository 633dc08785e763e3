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

log = logging.getLogger(__name__)

DATA_FORMATS = ("auto", "flickr30k", "karpathy", "coco", "csv", "jsonl", "shapes")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MONITORS = ("val_loss", "cider")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("exponential", "cosine", "constant", "plateau")
OBJECTIVES = ("xe", "scst")
BASELINES = ("mean", "greedy")
LOGS = ("none", "tensorboard")
# old key -> new key: configs and checkpoints written with the old name still load, with a warning
MAX_TOKENS = 4096     # the word positions' table holds max_tokens x d_model numbers
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

    _validate_data_model(cfg, need)
    _validate_train(cfg, need)
    need(bool(cfg.run_dir), "run_dir", "must not be empty")
    _validate_objective(cfg, need)
    # format shapes generates its data when missing; every other format must find it
    if check_paths and d.format != "shapes":
        need(Path(d.images).expanduser().is_dir(), "data.images",
             f"folder {d.images!r} does not exist")
        captions = Path(d.captions).expanduser()   # coco, auto: a file or COCO's annotations/
        need(captions.exists() if d.format in ("coco", "auto") else captions.is_file(),
             "data.captions",
             f"{'' if d.format in ('coco', 'auto') else 'file '}{d.captions!r} does not exist")
    return cfg


def _validate_data_model(cfg: Config, need) -> None:
    d, m = cfg.data, cfg.model
    need(d.format in DATA_FORMATS, "data.format",
         f"must be one of {DATA_FORMATS}, got {d.format!r}")
    need(d.image_size >= 32, "data.image_size",
         f"must be at least 32 (the ResNet stride), got {d.image_size}")
    need(d.min_freq >= 1, "data.min_freq", f"must be >= 1, got {d.min_freq}")
    need(d.max_words >= 1, "data.max_words", f"must be >= 1, got {d.max_words}")
    need(d.max_words + 2 <= m.max_tokens <= MAX_TOKENS, "model.max_tokens",
         f"must be data.max_words + 2 ({d.max_words + 2}: <bos> and <eos>) to {MAX_TOKENS}, "
         f"got {m.max_tokens}")
    for key in ("val_fraction", "test_fraction"):
        need(0.0 <= getattr(d, key) < 0.5, f"data.{key}",
             f"must be in [0, 0.5), got {getattr(d, key)}")
    need(d.shapes_images >= 10, "data.shapes_images", f"must be >= 10, got {d.shapes_images}")
    need(m.backbone.startswith(("resnet", "wide_resnet", "resnext")), "model.backbone",
         "must name a torchvision ResNet (resnet18 ... resnet152, resnext*, wide_resnet*), "
         f"got {m.backbone!r}")
    need(1 <= m.backbone_stages <= 4, "model.backbone_stages",
         f"must be 1 to 4, got {m.backbone_stages}")
    for key in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers",
                "dim_feedforward"):
        need(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    need(m.d_model % m.num_heads == 0, "model.d_model",
         f"{m.d_model} is not divisible by model.num_heads={m.num_heads}")
    need(m.d_model % 4 == 0, "model.d_model",
         f"must be a multiple of 4 (2-D positional encoding), got {m.d_model}")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")


def _validate_train(cfg: Config, need) -> None:
    t = cfg.train
    for key in ("epochs", "batch_size"):
        need(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(0 < t.gamma <= 1, "train.gamma", f"must be in (0, 1], got {t.gamma}")
    need(t.optimizer in OPTIMIZERS, "train.optimizer",
         f"must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    need(t.scheduler in SCHEDULERS, "train.scheduler",
         f"must be one of {SCHEDULERS}, got {t.scheduler!r}")
    need(0 <= t.label_smoothing < 1, "train.label_smoothing",
         f"must be in [0, 1), got {t.label_smoothing}")
    need(t.precision in PRECISIONS, "train.precision",
         f"must be one of {PRECISIONS}, got {t.precision!r}")
    need(t.monitor in MONITORS, "train.monitor", f"must be one of {MONITORS}, got {t.monitor!r}")
    need(t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}")
    need(not (t.cache_features and cfg.model.train_backbone), "train.cache_features",
         "needs a frozen encoder (model.train_backbone: false): "
         "a trained backbone's features change every step")
    for key in ("weight_decay", "warmup_steps", "patience", "eval_images", "save_every",
                "num_workers", "grad_clip"):
        need(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    need(t.log in LOGS, "train.log", f"must be one of {LOGS}, got {t.log!r}")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         f"must be auto, cpu or cuda[:N], got {t.device!r}")


def _validate_objective(cfg: Config, need) -> None:
    """train.objective and scst.*; train.init_from's file is looked for only when a run starts
    from it (train.read_init): a resumed run, or a checkpoint scored elsewhere, need not have it."""
    t, s = cfg.train, cfg.scst
    need(t.objective in OBJECTIVES, "train.objective",
         f"must be one of {OBJECTIVES}, got {t.objective!r}")
    need(t.eval_beam >= 1, "train.eval_beam", f"must be >= 1, got {t.eval_beam}")
    need(s.baseline in BASELINES, "scst.baseline",
         f"must be one of {BASELINES}, got {s.baseline!r}")
    need(s.samples >= (2 if s.baseline == "mean" else 1), "scst.samples",
         f"must be >= {2 if s.baseline == 'mean' else 1} (scst.baseline={s.baseline}), "
         f"got {s.samples}")
    if t.objective == "scst":
        need(1 <= s.max_words <= cfg.model.max_tokens - 2, "scst.max_words",
             f"must be 1 to model.max_tokens - 2 ({cfg.model.max_tokens - 2}), got {s.max_words}")
        need(bool(t.init_from), "train.init_from",
             "train.objective=scst starts from a trained model: "
             "name its checkpoint (e.g. runs/shapes/best.pt)")
        need(t.monitor == "cider", "train.monitor",
             "train.objective=scst selects its model by validation CIDEr: "
             f"set train.monitor=cider (got {t.monitor!r}; "
             "the cross-entropy it does not optimise says little)")


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


PATH_KEYS = ("run_dir", "data.images", "data.captions", "data.features_dir", "train.init_from")


def absolute_paths(cfg: Config, base: str | Path | None = None) -> tuple[Config, dict[str, str]]:
    """A copy of cfg with its relative paths made absolute against `base` (default: the working
    folder), and {key: path as given} of those it changed: a run directory then works anywhere."""
    cfg, given = copy.deepcopy(cfg), {}
    base = Path(base or Path.cwd())
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, name)
        if not value:                      # an optional path left empty (train.init_from)
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            setattr(owner, name, os.path.normpath(base / path))
            given[key] = value
    return cfg, given


def save_config(cfg: Config, path: str | Path, given: dict[str, str] | None = None) -> None:
    """A run's config.yaml; `given`: the paths as written before made absolute, as a comment."""
    with open(path, "w") as f:
        if given:
            f.write(f"# relative paths were made absolute against {Path.cwd()}; as given:\n")
            f.writelines(f"#   {key}: {value}\n" for key, value in given.items())
        yaml.safe_dump(asdict(cfg), f, sort_keys=False)
