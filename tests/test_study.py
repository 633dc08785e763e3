"""Studies: paths relative to the study file, one run per (variant, seed), the summary over seeds, reuse."""
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from captioning.config import ConfigError, save_config
from captioning.train import study as study_module
from captioning.train.study import format_summary, load_study, locate, run_study, summarize
from conftest import tiny_config


def write_study(path: Path, **study) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture
def base_config(tmp_path):
    """A tiny base config in tmp_path/configs (format shapes: its data paths are not checked on load)."""
    (tmp_path / "configs").mkdir()
    save_config(tiny_config(tmp_path / "nowhere", "runs/unused"), tmp_path / "configs" / "base.yaml")
    return tmp_path / "configs" / "base.yaml"


def test_paths_resolve_relative_to_the_study_file_from_any_working_folder(base_config, tmp_path, monkeypatch):
    path = write_study(tmp_path / "studies" / "s.yaml", base="../configs/base.yaml", run_root="../runs/study",
                       set={"data.images": "../data/shapes/flickr30k_images", "data.captions": "../data/shapes/r.csv",
                            "data": {"features_dir": "../features"}, "train": {"epochs": 3}},
                       variants={"a": {"model.d_model": 16, "model.num_heads": 2}, "b": {"run_dir": "../elsewhere/b"}})
    root = tmp_path.resolve()
    (tmp_path / "cwd").mkdir()
    for cwd, given in ((tmp_path / "cwd", "../studies/s.yaml"), (tmp_path / "studies", "s.yaml"),
                       (Path("/"), str(path))):
        monkeypatch.chdir(cwd)
        a, b = load_study(given)
        assert Path(a.config.run_dir) == root / "runs" / "study" / "a" / "seed0"
        assert Path(b.config.run_dir) == root / "elsewhere" / "b" / "seed0"     # a variant's own run_dir
        assert Path(a.config.data.images) == root / "data" / "shapes" / "flickr30k_images"
        assert Path(a.config.data.captions) == root / "data" / "shapes" / "r.csv"
        assert Path(a.config.data.features_dir) == root / "features"            # nested sections work too
        assert a.config.train.epochs == 3 and a.config.model.d_model == 16 and b.config.model.d_model == 32
    # the caller's overrides are the caller's: relative to the working folder, as for train --set
    a, _ = load_study(path, ["data.features_dir=feats"])
    assert a.config.data.features_dir == "feats"


def test_locate_finds_the_study_from_the_notebooks_folder_and_from_the_repo_root(tmp_path, monkeypatch):
    write_study(tmp_path / "extra_research" / "s.yaml", base="x", run_root="y", variants={"a": {}})
    monkeypatch.chdir(tmp_path / "extra_research")
    assert locate("s.yaml", "extra_research") == Path("s.yaml")
    monkeypatch.chdir(tmp_path)
    assert locate("s.yaml", "extra_research") == Path("extra_research/s.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        locate("missing.yaml", "extra_research")


def test_every_variant_runs_once_per_seed_in_its_own_folder(base_config, tmp_path):
    path = write_study(tmp_path / "s.yaml", base="configs/base.yaml", run_root="runs", seeds=[0, 2],
                       variants={"a": {"model.d_model": 16, "model.num_heads": 2}, "b": None})
    runs = load_study(path)
    assert [(r.variant, r.seed) for r in runs] == [("a", 0), ("a", 2), ("b", 0), ("b", 2)]
    for r in runs:
        assert r.config.seed == r.seed
        assert r.run_dir == tmp_path.resolve() / "runs" / r.variant / f"seed{r.seed}"
        assert r.config.data.split_seed == 0             # the split is not the seed's: the same test images
    assert len({r.config.run_dir for r in runs}) == 4
    no_seeds = write_study(tmp_path / "t.yaml", base="configs/base.yaml", run_root="runs", variants={"a": {}})
    assert [r.seed for r in load_study(no_seeds)] == [0]                    # no seeds: [0]


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 0]}, "twice"),
    ({"seeds": []}, "seeds"),
    ({"seeds": ["0"]}, "seeds"),
    ({"set": {"seed": 3}}, "seeds"),
    ({"variants": {"a": {"seed": 3}}}, "seeds"),
    ({"set": {"run_dir": "x"}}, "run_root"),
    ({"variants": {"a/b": {}}}, "folder name"),
    ({"repeats": 3}, "unknown study key"),
])
def test_a_bad_study_file_is_refused_naming_the_key(base_config, tmp_path, change, message):
    study = {"base": "configs/base.yaml", "run_root": "runs", "variants": {"a": {}}, **change}
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path / "s.yaml", **study))


def test_the_study_sets_seed_and_run_dir_itself(base_config, tmp_path):
    path = write_study(tmp_path / "s.yaml", base="configs/base.yaml", run_root="runs", variants={"a": {}})
    for item in ("seed=3", "run_dir=x"):
        with pytest.raises(ConfigError, match="per run"):
            load_study(path, [item])


def test_summarize_gives_mean_and_sample_std_per_variant_in_order():
    table = pd.DataFrame({"variant": ["b", "a", "a", "a"], "seed": [0, 0, 1, 2], "d_model": [64, 32, 32, 32],
                          "num_heads": [4, 2, 2, 2], "trainable_params": [900, 500, 500, 500],
                          "best_val_loss": [0.5, 0.30, 0.32, 0.34], "BLEU-4": [0.7, 0.8, 0.9, 1.0],
                          "CIDEr": [4.0, 4.0, 5.0, 6.0], "seconds_per_epoch": [10.0, 2.0, 4.0, 6.0]})
    summary = summarize(table)
    assert list(summary.columns) == ["variant", "d_model", "num_heads", "trainable_params", "n",
                                     "best_val_loss_mean", "best_val_loss_std", "BLEU-4_mean", "BLEU-4_std",
                                     "CIDEr_mean", "CIDEr_std", "seconds_per_epoch_mean", "seconds_per_epoch_std"]
    assert list(summary["variant"]) == ["b", "a"] and list(summary["n"]) == [1, 3]
    a = summary.set_index("variant").loc["a"]
    assert a["best_val_loss_mean"] == pytest.approx(0.32) and a["best_val_loss_std"] == pytest.approx(0.02)
    assert a["CIDEr_mean"] == pytest.approx(5.0) and a["CIDEr_std"] == pytest.approx(1.0)   # ddof=1, not 0.816
    assert a["seconds_per_epoch_std"] == pytest.approx(2.0) and a["d_model"] == 32
    assert math.isnan(summary.set_index("variant").loc["b", "BLEU-4_std"])                 # one seed: no spread
    shown = format_summary(summary).set_index("variant")
    assert shown.loc["a", "best_val_loss"] == "0.320 ± 0.020"
    assert shown.loc["a", "seconds_per_epoch"] == "4.0 ± 2.0"
    assert shown.loc["b", "CIDEr"] == "4.000"


@pytest.mark.slow
def test_a_rerun_reuses_finished_runs_and_trains_only_the_new_seed(shapes_dir, tmp_path, monkeypatch):
    base = tmp_path / "study" / "base.yaml"
    base.parent.mkdir()
    save_config(tiny_config(shapes_dir, "unused", "train.epochs=1"), base)
    images = os.path.relpath(shapes_dir / "flickr30k_images", base.parent)     # relative to the study file
    captions = os.path.relpath(shapes_dir / "results.csv", base.parent)
    study = {"base": "base.yaml", "run_root": "../runs", "seeds": [0, 1],
             "set": {"data.images": images, "data.captions": captions}, "variants": {"d16": {"model.d_model": 16}}}
    path = write_study(tmp_path / "study" / "s.yaml", **study)
    monkeypatch.chdir(tmp_path)
    first = run_study("study/s.yaml", progress=False, java=False)
    assert list(first["seed"]) == [0, 1] and set(first["variant"]) == {"d16"}
    runs = tmp_path / "runs" / "d16"
    for seed in (0, 1):
        assert yaml.safe_load((runs / f"seed{seed}" / "config.yaml").read_text())["seed"] == seed
    assert (runs / "seed0" / "splits.json").read_text() == (runs / "seed1" / "splits.json").read_text()
    assert first["best_val_loss"].iloc[0] != first["best_val_loss"].iloc[1]  # the seed changed the training
    assert pd.read_csv(tmp_path / "study" / "s" / "results.csv").shape[0] == 2   # beside the study file, by its name
    stamps = {s: (runs / f"seed{s}" / "best.pt").stat().st_mtime_ns for s in (0, 1)}

    trained = []
    real = study_module.train_or_resume
    monkeypatch.setattr(study_module, "train_or_resume",
                        lambda cfg, *a, **k: trained.append(cfg.seed) or real(cfg, *a, **k))
    write_study(path, **{**study, "seeds": [0, 1, 2]})
    second = run_study(path, progress=False, java=False)
    assert trained == [2]                                                     # only the new seed trained
    assert {s: (runs / f"seed{s}" / "best.pt").stat().st_mtime_ns for s in (0, 1)} == stamps
    assert list(second["seed"]) == [0, 1, 2]
    pd.testing.assert_frame_equal(second.iloc[:2], first)                     # the reused runs score the same
    assert summarize(second)["n"].tolist() == [3]
    assert (tmp_path / "study" / "s" / "loss_curves.png").stat().st_size > 1000

    # a run folder of other settings is refused, not silently reused
    write_study(path, **{**study, "variants": {"d16": {"model.d_model": 16, "model.dropout": 0.3}}})
    with pytest.raises(ConfigError, match="model.dropout"):
        run_study(path, progress=False, java=False)


def test_a_variant_starts_from_another_variants_checkpoint_of_the_same_seed(base_config, tmp_path):
    scst = {"from": "xe", "train.objective": "scst", "train.monitor": "cider", "scst.max_words": 8}
    path = write_study(tmp_path / "s.yaml", base="configs/base.yaml", run_root="runs", seeds=[0, 1],
                       variants={"xe": {}, "scst": scst})
    runs = load_study(path)
    assert [(r.variant, r.seed) for r in runs] == [("xe", 0), ("xe", 1), ("scst", 0), ("scst", 1)]
    for run in runs[2:]:      # the checkpoint need not exist yet: xe trains first
        assert run.config.train.init_from == str(tmp_path.resolve() / "runs" / "xe" / f"seed{run.seed}" / "best.pt")
    assert runs[0].config.train.init_from == ""
    bad = write_study(tmp_path / "bad.yaml", base="configs/base.yaml", run_root="runs",
                      variants={"scst": scst, "xe": {}})
    with pytest.raises(ConfigError, match="from: 'xe' must name a variant listed before it"):
        load_study(bad)
