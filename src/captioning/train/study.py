"""Model-size studies: variants of one config, several seeds each, same data, schedule and code.

A study is a YAML file (see extra_research/dmodel_study.yaml):

    base: ../configs/shapes.yaml           # the config every run starts from
    run_root: ../runs/dmodel_study         # each run trains in run_root/VARIANT/seed{S}
    seeds: [0, 1, 2]                       # every variant trains once per seed (default [0])
    set:                                   # overrides for every variant
      train.epochs: 6
      data.images: ../data/shapes/flickr30k_images
    variants:                              # VARIANT: its own overrides
      d128_h4: {model.d_model: 128, model.num_heads: 4, model.dim_feedforward: 512}

Paths in it (`base`, `run_root`, and the PATH_KEYS overrides) are relative to its folder. Overrides
may be dotted keys (`train.epochs: 6`) or nested (`train: {epochs: 6}`). A variant may set its own
`run_dir` (its seeds train in run_dir/seed{S}). `seed` is set per run from `seeds`; it changes the
initialisation and data order, not the split (`data.split_seed`), so all seeds share a test split.

`run_study` trains each run (a finished run is reused, a stopped one resumed: adding a seed trains
only that seed) and scores its best.pt on the test split, one row per run; `summarize` gives a row
per variant (mean and sample std over the seeds); `plot_study` overlays the loss curves.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import yaml

from ..config import PATH_KEYS, Config, ConfigError, flatten, from_dict, load_config, validate
from ..eval.evaluate import evaluate
from ..model.caption_model import count_parameters
from ..model.checkpoint import load_checkpoint
from .run import train_or_resume

log = logging.getLogger(__name__)
COLUMNS = ("variant", "seed", "d_model", "num_heads", "trainable_params", "epochs",
           "seconds_per_epoch", "best_val_loss", "BLEU-4", "METEOR", "CIDEr", "shapes_accuracy",
           "mean_words", "function_word_end", "distinct_1", "distinct_2", "example_image",
           "example_caption")
STUDY_KEYS = ("base", "run_root", "seeds", "set", "variants", "evaluate")
# what summarize() averages over the seeds, and the decimals format_summary() shows them with
SUMMARY_METRICS = {"best_val_loss": 3, "BLEU-4": 3, "METEOR": 3, "CIDEr": 3, "shapes_accuracy": 3,
                   "mean_words": 2, "function_word_end": 3, "distinct_1": 3, "distinct_2": 3,
                   "seconds_per_epoch": 1}
# evaluate's figures a row keeps (those a run lacks, e.g. METEOR without Java, stay empty)
RESULT_METRICS = ("BLEU-4", "METEOR", "CIDEr", "shapes_accuracy", "mean_words", "function_word_end",
                  "distinct_1", "distinct_2")
# what may differ between a run's saved config and the study's for the run to be reused (or resumed)
_REUSE_IGNORES = {"run_dir", "data.images", "data.captions", "data.features_dir", "train.epochs",
                  "train.patience", "train.num_workers", "train.device", "train.save_every",
                  "train.log"}


@dataclass
class Run:
    """One training run of a study: a variant trained with one seed."""
    variant: str
    seed: int
    config: Config
    evaluate: dict = field(default_factory=dict)    # decoding options of the test captions

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def locate(path: str | Path, *folders: str | Path) -> Path:
    """`path` if it exists from the working folder, else the first folders[i]/path that does: for
    notebooks run from their folder or the repo root, locate("x.yaml", "extra_research")."""
    path = Path(path).expanduser()
    candidates = [path] + ([] if path.is_absolute() else [Path(f) / path for f in folders])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{str(path)!r} does not exist "
                      f"(looked in: {', '.join(str(c) for c in candidates)}, from {Path.cwd()})")


def _flatten(mapping: dict, where: str, prefix: str = "") -> dict:
    """{'train': {'epochs': 6}, 'model.d_model': 8} -> {'train.epochs': 6, 'model.d_model': 8}."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys to values, got {mapping!r}")
    return flatten(mapping, prefix)


def _resolve(value, folder: Path, where: str) -> str:
    """A path of the study file: absolute, relative to the study file's folder."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else folder / path)


def _overrides(values: dict, folder: Path, where: str) -> dict:
    """The study file's overrides, flattened, with their paths resolved against its folder."""
    values = _flatten(values or {}, where)
    if "seed" in values:
        raise ConfigError(f"{where}: 'seed' is set per run from the study key 'seeds' "
                          "(e.g. seeds: [0, 1, 2])")
    return {k: _resolve(v, folder, f"{where}: {k}") if k in PATH_KEYS else v
            for k, v in values.items()}


def _as_set(values: dict) -> list[str]:
    """Overrides as load_config takes them; values in JSON (a YAML subset): strings stay strings."""
    return [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in values.items()]


def _seeds(value, where: str) -> list[int]:
    seeds = [0] if value is None else value
    if not isinstance(seeds, list) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of integers >= 0, "
                          f"got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: 'seeds' lists a seed twice: {seeds}")
    return seeds


def load_study(path: str | Path, overrides: list[str] = ()) -> list[Run]:
    """The runs of a study file (variant by variant, each with every seed), each a validated Config.
    `overrides` (key=value, as for train --set) apply to every run after the study's own `set`;
    their paths are relative to the working folder, the study file's to its folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    study = yaml.safe_load(path.read_text()) or {}
    if not isinstance(study, dict):
        raise ConfigError(f"{path}: expected a mapping of study keys ({', '.join(STUDY_KEYS)})")
    unknown = set(study) - set(STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown study key(s) {sorted(unknown)} "
                          f"(known: {', '.join(STUDY_KEYS)})")
    for key in ("base", "run_root", "variants"):
        if not study.get(key):
            raise ConfigError(f"{path}: study key '{key}' is missing")
    if not isinstance(study["variants"], dict):
        raise ConfigError(f"{path}: 'variants' must map each variant's name to its overrides")
    for item in overrides:
        if item.partition("=")[0].strip() in ("seed", "run_dir"):
            raise ConfigError(f"override {item!r}: the study sets 'seed' and 'run_dir' per run "
                              "(study keys 'seeds' and 'run_root')")
    folder = path.resolve().parent
    base = _resolve(study["base"], folder, f"{path}: base")
    run_root = Path(_resolve(study["run_root"], folder, f"{path}: run_root"))
    seeds = _seeds(study.get("seeds"), str(path))
    common = _overrides(study.get("set"), folder, f"{path}: set")
    scoring = study.get("evaluate") or {}
    if not isinstance(scoring, dict):
        raise ConfigError(f"{path}: 'evaluate' must map decoding options to values, "
                          "e.g. {beam_size: 3}")
    if "run_dir" in common:
        raise ConfigError(f"{path}: set: 'run_dir' would put every variant in one folder: "
                          "use 'run_root'")
    runs = []
    variant_dirs = {}
    for name, own in study["variants"].items():
        name = str(name)
        if not name or name != Path(name).name or name in (".", ".."):
            raise ConfigError(f"{path}: variant name {name!r} must be a plain folder name")
        own = _overrides(own, folder, f"{path}: variants: {name}")
        start = _start_variant(own, variant_dirs, f"{path}: variants: {name}")
        variant_dirs[name] = variant_dir = Path(own.pop("run_dir", run_root / name))
        for seed in seeds:
            last = {"seed": seed, "run_dir": str(variant_dir / f"seed{seed}")}
            if start is not None:          # that variant's best.pt of the same seed, trained first
                last["train.init_from"] = str(variant_dirs[start] / f"seed{seed}" / "best.pt")
            cfg = load_config(base, _as_set(common) + list(overrides) + _as_set(own)
                              + _as_set(last), check_paths=start is None)
            runs.append(Run(name, seed, cfg, scoring))
    return runs


def _start_variant(own: dict, earlier: dict, where: str) -> str | None:
    """A variant's `from: OTHER`: each run's train.init_from is OTHER's best.pt of the same seed."""
    start = own.pop("from", None)
    if start is not None and str(start) not in earlier:
        raise ConfigError(f"{where}: from: {start!r} must name a variant listed before it "
                          f"({', '.join(earlier)})")
    return None if start is None else str(start)


def describe(runs: list[Run]) -> pd.DataFrame:
    """One row per run: what differs between the variants, its seed, epochs and run directory."""
    def shown(path: Path) -> str:    # relative when near (runs/..., ../runs/...), else absolute
        try:
            relative = os.path.relpath(path)
        except ValueError:           # another drive (Windows)
            return str(path)
        return relative if Path(relative).parts[:2].count("..") <= 1 else str(path)
    return pd.DataFrame([{"variant": r.variant, "seed": r.seed, "d_model": r.config.model.d_model,
                          "num_heads": r.config.model.num_heads,
                          "dim_feedforward": r.config.model.dim_feedforward,
                          "epochs": r.config.train.epochs, "run_dir": shown(r.run_dir)}
                         for r in runs])


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def _flat_config(cfg: Config) -> dict:
    return _flatten(asdict(cfg), "config")


def _check_same_run(cfg: Config, run_dir: Path) -> None:
    """A run directory holding a run of other settings (the study changed since) is not reused."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = _flat_config(from_dict(yaml.safe_load(saved.read_text()) or {}, check_paths=False))
    except ConfigError as e:
        raise ConfigError(f"{saved}: {e}") from e
    new = _flat_config(cfg)
    changed = sorted(k for k in old.keys() & new.keys()
                     if k not in _REUSE_IGNORES and old[k] != new[k])
    if changed:
        diff = ", ".join(f"{k}: {old[k]!r} there, {new[k]!r} now" for k in changed)
        raise ConfigError(f"{run_dir} holds a run of other settings ({diff}): "
                          "delete it to train it again, or give the study another run_root")


def _finished(cfg: Config) -> bool:
    """The run trained all its epochs, or stopped early on its patience."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "best.pt").is_file() or not (run_dir / "history.csv").is_file():
        return False
    history = _history(run_dir)
    if not history:
        return False
    if len(history) >= cfg.train.epochs:
        return True
    values = [float(h["val_loss"]) for h in history]
    since_best = len(values) - 1 - values.index(min(values))
    return (cfg.train.monitor == "val_loss" and bool(cfg.train.patience)
            and since_best >= cfg.train.patience)


def _train_run(cfg: Config, progress: bool) -> None:
    """Train the run from scratch, or resume its last.pt (to the study's epochs and patience)."""
    train_or_resume(cfg, [f"train.epochs={cfg.train.epochs}",
                          f"train.patience={cfg.train.patience}"], progress)


def run_one(run: Run, progress: bool = True, java: bool | None = None) -> dict:
    """Train a run (resume it, or reuse it if finished); score best.pt on the test split: a row."""
    cfg, run_dir = run.config, run.run_dir
    validate(cfg)    # its data paths too (a `from` variant was loaded without that check)
    _check_same_run(cfg, run_dir)
    if _finished(cfg):
        log.info("%s: finished in %s, reused", run.name, run_dir)
    else:
        log.info("training %s in %s%s", run.name, run_dir,
                 " (resumed)" if (run_dir / "last.pt").is_file() else "")
        _train_run(cfg, progress)
    report = evaluate(run_dir / "best.pt", split="test", precision="fp32", progress=progress,
                      java=java, **run.evaluate)
    history = _history(run_dir)
    model, _, _ = load_checkpoint(run_dir / "best.pt")
    example, metrics = report["predictions"][0], report["metrics"]
    return {"variant": run.variant, "seed": run.seed, "d_model": cfg.model.d_model,
            "num_heads": cfg.model.num_heads, "trainable_params": count_parameters(model)[0],
            "epochs": len(history),
            "seconds_per_epoch": round(sum(float(h["seconds"]) for h in history) / len(history), 1),
            "best_val_loss": min(float(h["val_loss"]) for h in history),
            **{k: round(metrics[k], 4) if isinstance(metrics.get(k), float) else metrics.get(k)
               for k in RESULT_METRICS},
            "example_image": example["image"], "example_caption": example["caption"]}


def output_dir(study: str | Path, out_dir: str | Path | None = None) -> Path:
    """Where run_study writes results.csv and the curves: out_dir, or else a folder named after the
    study file beside it (extra_research/dmodel_study.yaml -> extra_research/dmodel_study/)."""
    study = Path(study).expanduser()
    return Path(out_dir) if out_dir is not None else study.parent / study.stem


def run_study(path: str | Path, overrides: list[str] = (), out_dir: str | Path | None = None,
              progress: bool = True, java: bool | None = None) -> pd.DataFrame:
    """Every run of the study, one row each: results.csv and loss_curves.png (reward_curves.png with
    SCST variants) in output_dir(path, out_dir)."""
    runs = load_study(path, overrides)
    out = output_dir(path, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([run_one(r, progress, java) for r in runs], columns=list(COLUMNS))
    table.to_csv(out / "results.csv", index=False)
    plot_study(runs, out / "loss_curves.png")
    if any(_history(r.run_dir)[0].get("reward") not in (None, "") for r in runs):
        plot_rewards(runs, out / "reward_curves.png")
    return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (in the table's order): its constant columns, n (the seeds), and each of
    SUMMARY_METRICS's mean and sample std (ddof=1; NaN for n=1) as METRIC_mean and METRIC_std."""
    groups = table.groupby("variant", sort=False)
    out = groups[[c for c in ("d_model", "num_heads", "trainable_params")
                  if c in table.columns]].first()
    out["n"] = groups.size()
    for metric in SUMMARY_METRICS:
        if metric in table.columns:
            out[f"{metric}_mean"] = groups[metric].mean()
            out[f"{metric}_std"] = groups[metric].std(ddof=1)
    return out.reset_index()


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """summarize()'s table to read: each metric as one "mean ± std" column ("0.304 ± 0.012"; the
    mean alone when n is 1)."""
    out = summary[[c for c in ("variant", "d_model", "num_heads", "trainable_params", "n")
                   if c in summary.columns]].copy()
    for metric, digits in SUMMARY_METRICS.items():
        if f"{metric}_mean" not in summary.columns:
            continue
        out[metric] = [f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")
                       for m, s in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"])]
    return out


def _mean_curve(histories: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """The mean over the runs of `key` at each epoch that every run reached."""
    epochs = min(len(h) for h in histories)
    return ([int(histories[0][i]["epoch"]) for i in range(epochs)],
            [sum(float(h[i][key]) for h in histories) / len(histories) for i in range(epochs)])


def plot_study(runs: list[Run], path: str | Path) -> Path:
    """Validation (solid) and training (dashed) cross-entropy, one colour per variant: each seed's
    validation curve thin, and the mean over the seeds bold (with its training curve dashed)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    variants = list(dict.fromkeys(r.variant for r in runs))
    for i, variant in enumerate(variants):
        color = f"C{i}"
        histories = [_history(r.run_dir) for r in runs if r.variant == variant]
        histories = [h for h in histories if h]
        if not histories:
            continue
        if len(histories) > 1:
            for h in histories:
                ax.plot([int(x["epoch"]) for x in h], [float(x["val_loss"]) for x in h],
                        color=color, lw=0.8, alpha=0.35)
        label = variant if len(histories) == 1 else f"{variant} (mean of {len(histories)} seeds)"
        ax.plot(*_mean_curve(histories, "val_loss"), color=color, lw=2.2, marker="o", ms=3.5,
                label=f"{label} val")
        if histories[0][0].get("reward") in (None, ""):  # SCST's train loss is no cross-entropy
            ax.plot(*_mean_curve(histories, "train_loss"), color=color, lw=1.2, ls="--", alpha=0.8,
                    label=f"{label} train")
    _label(ax, "cross-entropy")
    return _save(fig, path)


def _label(ax, ylabel: str) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_rewards(runs: list[Run], path: str | Path) -> Path:
    """Self-critical variants: the mean CIDEr-D reward of the samples (left) and the validation
    CIDEr (right) per epoch, one colour per variant, each seed thin and the mean over the seeds
    bold."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    variants = list(dict.fromkeys(r.variant for r in runs))
    for ax, key, label in zip(axes, ("reward", "val_cider"),
                              ("mean reward of the samples", "validation CIDEr")):
        for i, variant in enumerate(variants):
            histories = [h for h in (_history(r.run_dir) for r in runs if r.variant == variant)
                         if h and all(x.get(key) not in (None, "") for x in h)]
            if not histories:
                continue
            for h in histories:
                ax.plot([int(x["epoch"]) for x in h], [float(x[key]) for x in h], color=f"C{i}",
                        lw=0.8, alpha=0.35)
            ax.plot(*_mean_curve(histories, key), color=f"C{i}", lw=2.2, marker="o", ms=3.5,
                    label=f"{variant} (mean of {len(histories)})")
        _label(ax, label)
    return _save(fig, path)
