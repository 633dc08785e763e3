"""A run's second phase, as training.ipynb runs it: the self-critical (SCST) config that goes with
the config a cross-entropy run was given, checked to train on that run's data before any training.

    scst_cfg, note = scst_phase("configs/coco.yaml", cfg, "auto")   # configs/coco_scst.yaml
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError, load_config

# the data keys that decide the images, their captions and the splits: an SCST phase that differs
# in any of them would score captions of images its cross-entropy model never split (or saw)
DATA_KEYS = ("format", "images", "captions", "val_fraction", "test_fraction", "split_seed",
             "shapes_images")


def scst_config_for(config: str | Path, scst_config: str | Path | None) -> Path | None:
    """`scst_config` as given; "auto": `<name>_scst.yaml` beside `config` when there is one."""
    if not scst_config:
        return None
    if str(scst_config) != "auto":
        return Path(scst_config)
    candidate = Path(config).with_name(f"{Path(config).stem}_scst.yaml")
    return candidate if candidate.is_file() else None


def scst_phase(config: str | Path, cfg: Config, scst_config: str | Path | None = "auto",
               overrides: list[str] = ()) -> tuple[Config | None, str]:
    """(the SCST phase's config, starting from cfg.run_dir's best.pt, or None; a line saying so).

    The run's `data.` overrides apply to it too. An SCST config of other data, or one whose
    objective is not scst, is a ConfigError now, before the first phase trains for hours.
    """
    path = scst_config_for(config, scst_config)
    if path is None:
        why = "scst_config is None" if not scst_config else \
            f"{Path(config).name} has no {Path(config).stem}_scst.yaml beside it"
        return None, (f"no SCST phase ({why}): set scst_config to an SCST config of this model "
                      "(as configs/coco_scst.yaml is for configs/coco.yaml) to add one")
    data_overrides = [item for item in overrides if item.strip().startswith("data.")]
    init = f"train.init_from={Path(cfg.run_dir) / 'best.pt'}"
    scst = load_config(path, [*data_overrides, init], check_paths=False)
    if scst.train.objective != "scst":
        raise ConfigError(f"scst_config {path}: train.objective is {scst.train.objective!r}, not "
                          "'scst': give an SCST config, or scst_config = None")
    differ = [key for key in DATA_KEYS if getattr(scst.data, key) != getattr(cfg.data, key)]
    if differ:
        raise ConfigError(f"scst_config {path} trains on other data than {config} (data."
                          f"{', data.'.join(differ)}): give an SCST config of this run's data "
                          f"(e.g. one with base: {Path(config).name}), or scst_config = None")
    if Path(scst.run_dir).resolve() == Path(cfg.run_dir).resolve():
        raise ConfigError(f"scst_config {path}: its run_dir is the first phase's ({cfg.run_dir}): "
                          "give it its own")
    return scst, f"then the SCST phase: {path}, from {Path(cfg.run_dir) / 'best.pt'}, " \
                 f"into {scst.run_dir}"
