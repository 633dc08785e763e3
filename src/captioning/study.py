"""Model-size studies: several variants of one config, same data and schedule, one code path.

A study is a YAML file (see extra_research/dmodel_study.yaml):

    base: configs/shapes.yaml              # the config every variant starts from
    run_root: runs/dmodel_study            # each variant trains in run_root/NAME
    set: {train.epochs: 6}                 # overrides for every variant
    variants:                              # NAME: its own overrides
      d128_h4: {model.d_model: 128, model.num_heads: 4, model.dim_feedforward: 512}

`run_study` trains each variant (or reuses a finished run: a study that stopped
half-way picks up where it was), scores its best.pt on the test split and
returns one row per variant; `plot_study` overlays their loss curves.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import yaml

from .checkpoint import load_checkpoint
from .config import Config, ConfigError, load_config
from .evaluate import evaluate
from .model import count_parameters
from .train import fit

log = logging.getLogger(__name__)
COLUMNS = ("variant", "d_model", "num_heads", "trainable_params", "epochs", "seconds_per_epoch", "best_val_loss",
           "BLEU-4", "CIDEr", "example_image", "example_caption")


@dataclass
class Variant:
    name: str
    config: Config


def load_study(path: str | Path, overrides: list[str] = ()) -> list[Variant]:
    """The variants of a study file, each a validated Config; `overrides` apply to all of them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    study = yaml.safe_load(path.read_text()) or {}
    unknown = set(study) - {"base", "run_root", "set", "variants"}
    if unknown:
        raise ConfigError(f"{path}: unknown study key(s) {sorted(unknown)} (known: base, run_root, set, variants)")
    for key in ("base", "run_root", "variants"):
        if not study.get(key):
            raise ConfigError(f"{path}: study key '{key}' is missing")
    if not isinstance(study["variants"], dict):
        raise ConfigError(f"{path}: 'variants' must map each variant's name to its overrides")
    common = [f"{k}={v}" for k, v in (study.get("set") or {}).items()] + list(overrides)
    variants = []
    for name, own in study["variants"].items():
        own = [f"{k}={v}" for k, v in (own or {}).items()]
        run_dir = f"run_dir={Path(study['run_root']) / name}"
        variants.append(Variant(name, load_config(study["base"], common + own + [run_dir])))
    return variants


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def _finished(cfg: Config) -> bool:
    """The run trained all its epochs, or stopped early on its patience."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "best.pt").is_file() or not (run_dir / "history.csv").is_file():
        return False
    history = _history(run_dir)
    if len(history) >= cfg.train.epochs:
        return True
    values = [float(h["val_loss"]) for h in history]
    since_best = len(values) - 1 - values.index(min(values))
    return cfg.train.monitor == "val_loss" and bool(cfg.train.patience) and since_best >= cfg.train.patience


def run_variant(variant: Variant, progress: bool = True, java: bool | None = None) -> dict:
    """Train one variant (continuing or reusing its run), score best.pt on the test split: one table row."""
    cfg, run_dir = variant.config, Path(variant.config.run_dir)
    if not _finished(cfg):
        resume = run_dir if (run_dir / "last.pt").is_file() else None
        log.info("training %s in %s%s", variant.name, run_dir, " (resumed)" if resume else "")
        fit(cfg, resume=resume, progress=progress)
    report = evaluate(run_dir / "best.pt", split="test", precision="fp32", progress=progress, java=java)
    history = _history(run_dir)
    model, _, _ = load_checkpoint(run_dir / "best.pt")
    example = report["predictions"][0]
    return {"variant": variant.name, "d_model": cfg.model.d_model, "num_heads": cfg.model.num_heads,
            "trainable_params": count_parameters(model)[0], "epochs": len(history),
            "seconds_per_epoch": round(sum(float(h["seconds"]) for h in history) / len(history), 1),
            "best_val_loss": min(float(h["val_loss"]) for h in history),
            "BLEU-4": round(report["metrics"]["BLEU-4"], 4), "CIDEr": round(report["metrics"]["CIDEr"], 4),
            "example_image": example["image"], "example_caption": example["caption"]}


def run_study(path: str | Path, overrides: list[str] = (), out_dir: str | Path | None = None,
              progress: bool = True, java: bool | None = None) -> pd.DataFrame:
    """Every variant of the study: results.csv and loss_curves.png in out_dir (default: beside the study)."""
    variants = load_study(path, overrides)
    out_dir = Path(out_dir) if out_dir is not None else Path(path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([run_variant(v, progress, java) for v in variants], columns=list(COLUMNS))
    table.to_csv(out_dir / "results.csv", index=False)
    plot_study(variants, out_dir / "loss_curves.png")
    return table


def plot_study(variants: list[Variant], path: str | Path) -> Path:
    """Train (dashed) and validation (solid) cross-entropy of every variant on one set of axes."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, v in enumerate(variants):
        history = _history(Path(v.config.run_dir))
        epochs = [int(h["epoch"]) for h in history]
        color = f"C{i}"
        ax.plot(epochs, [float(h["val_loss"]) for h in history], color=color, marker="o", ms=3, label=f"{v.name} val")
        ax.plot(epochs, [float(h["train_loss"]) for h in history], color=color, ls="--", alpha=0.7,
                label=f"{v.name} train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
