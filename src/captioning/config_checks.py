"""The checks of `config.validate` on each section's values: pure functions of (cfg, need), where
`need(ok, key, why)` raises the ConfigError naming the key; the choices each key may take."""
from __future__ import annotations

from pathlib import Path

MAX_TOKENS = 4096     # the word positions' table holds max_tokens x d_model numbers
DATA_FORMATS = ("auto", "flickr30k", "karpathy", "coco", "csv", "jsonl", "shapes", "webdataset")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MONITORS = ("val_loss", "cider")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("exponential", "cosine", "constant", "plateau")
OBJECTIVES = ("xe", "scst")
BASELINES = ("mean", "greedy")
LOGS = ("none", "tensorboard")


def validate_data_model(cfg, need) -> None:
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


def validate_train(cfg, need) -> None:
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


def validate_objective(cfg, need) -> None:
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


def validate_shards(cfg, need, check_paths: bool) -> None:
    """data.format webdataset: data.shards and what a stream of samples cannot (yet) serve."""
    d, t = cfg.data, cfg.train
    need(d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {d.shuffle_buffer}")
    if d.format != "webdataset":
        return
    need(bool(d.shards), "data.shards",
         "data.format webdataset reads tar shards: name the folder the `shards` command wrote "
         "(or its index.json), or a pattern like DIR/{train,val}-{000000..000003}.tar")
    local = "://" not in d.shards and "{" not in d.shards and "::" not in d.shards
    if check_paths and local:
        need(Path(d.shards).expanduser().exists(), "data.shards",
             f"{d.shards!r} does not exist (write it with `python -m captioning shards`)")
    why = "is not available with data.format webdataset"
    need(t.monitor == "val_loss", "train.monitor",
         f"{why} ({t.monitor!r} captions the val split by index): use val_loss")
    need(t.objective == "xe", "train.objective",
         f"{why} ({t.objective!r} needs every training caption up front): use xe")
