"""training.ipynb's SCST phase follows the config it was given (train/phases.py), checked before any training."""
import pytest

from captioning.config import ConfigError, save_config
from captioning.train.phases import scst_config_for, scst_phase
from conftest import tiny_config


def write(path, text):
    path.write_text(text)
    return path


def test_auto_takes_the_scst_config_beside_the_config_and_none_when_there_is_none(tmp_path):
    config = write(tmp_path / "coco.yaml", "run_dir: runs/coco\n")
    assert scst_config_for(config, "auto") is None
    write(tmp_path / "coco_scst.yaml", "base: coco.yaml\n")
    assert scst_config_for(config, "auto") == tmp_path / "coco_scst.yaml"
    assert scst_config_for(config, None) is None and scst_config_for(config, "x.yaml").name == "x.yaml"


def test_the_scst_phase_starts_from_the_run_s_best_pt_with_its_data_overrides(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, tmp_path / "run", "data.max_words=12")
    save_config(cfg, tmp_path / "mine.yaml")
    write(tmp_path / "mine_scst.yaml", "base: mine.yaml\nrun_dir: " + str(tmp_path / "scst")
          + "\ntrain:\n  objective: scst\n  monitor: cider\n  epochs: 7\nscst:\n  max_words: 8\n")
    scst, note = scst_phase(tmp_path / "mine.yaml", cfg, "auto", ["data.max_words=12", "train.epochs=1"])
    assert scst.train.init_from == str(tmp_path / "run" / "best.pt")
    assert scst.data.max_words == 12 and scst.train.epochs == 7        # data overrides follow, train ones do not
    assert "mine_scst.yaml" in note and str(tmp_path / "scst") in note


def test_an_scst_config_of_other_data_is_refused_before_any_training(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, tmp_path / "run", "data.format=flickr30k")
    save_config(cfg, tmp_path / "photos.yaml")
    (tmp_path / "xe.pt").touch()                                # the phase replaces init_from
    shapes = tiny_config(shapes_dir, tmp_path / "scst", "train.objective=scst", "train.monitor=cider",
                         "scst.max_words=8", "data.split_seed=3", f"train.init_from={tmp_path / 'xe.pt'}")
    save_config(shapes, tmp_path / "other_scst.yaml")
    with pytest.raises(ConfigError, match=r"other_scst.yaml trains on other data than .*photos.yaml "
                                          r"\(data.format, data.split_seed\)"):
        scst_phase(tmp_path / "photos.yaml", cfg, tmp_path / "other_scst.yaml")
    save_config(tiny_config(shapes_dir, tmp_path / "xe2", "data.format=flickr30k"), tmp_path / "xe.yaml")
    with pytest.raises(ConfigError, match="train.objective is 'xe', not 'scst'"):
        scst_phase(tmp_path / "photos.yaml", cfg, tmp_path / "xe.yaml")


def test_a_notebook_names_its_own_parameter_when_the_run_dir_holds_a_run(tmp_path):
    from captioning.train.run import train
    cfg = tiny_config(tmp_path, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").touch()
    with pytest.raises(FileExistsError, match="continue it with resume = True in the parameters cell"):
        train(cfg, resume_hint="resume = True in the parameters cell")
