"""train.objective=scst: a second phase of training from a cross-entropy checkpoint, with its reward's
document frequencies in the run directory, resumable bit-exact, its history and its errors."""
import csv
import json

import pytest
import torch

from captioning.config import ConfigError
from captioning.data.vocab import Vocabulary
from captioning.model.checkpoint import read_checkpoint
from captioning.train.loop import NonFiniteLossError
from captioning.train.run import fit
from conftest import crash_after_first_mid_epoch_save, tiny_config

SCST = ("train.objective=scst", "train.monitor=cider", "scst.samples=3", "scst.max_words=8", "train.lr=1e-4",
        "train.scheduler=constant")


def scst_config(shapes_dir, run_dir, init_run, *overrides):
    return tiny_config(shapes_dir, run_dir, *SCST, f"train.init_from={init_run / 'best.pt'}", *overrides)


def test_scst_starts_from_the_checkpoint_with_its_vocabulary_and_splits(shapes_dir, tiny_run, tmp_path):
    run = fit(scst_config(shapes_dir, tmp_path / "scst", tiny_run, "train.epochs=2"), progress=False)
    init, best = read_checkpoint(tiny_run / "best.pt"), read_checkpoint(run / "best.pt")
    assert best["vocab"] == init["vocab"]
    assert json.loads((run / "splits.json").read_text()) == json.loads((tiny_run / "splits.json").read_text())
    # the reward's document frequencies, stored with the vocabulary's fingerprint
    df = json.loads((run / "cider_df.json").read_text())
    assert df["vocab_sha256"] == Vocabulary.from_list(init["vocab"]).fingerprint()
    assert df["images"] == len(json.loads((run / "splits.json").read_text())["train"])
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row in rows:          # mean reward and baseline per epoch; best.pt picked by validation CIDEr
        assert float(row["reward"]) >= 0 and float(row["baseline"]) >= 0 and row["val_cider"] != ""
        assert float(row["lr"]) == pytest.approx(1e-4)                # constant
    assert (run / "reward.png").is_file()
    # the weights moved away from the checkpoint's
    assert not torch.equal(best["model"]["head.weight"], init["model"]["head.weight"])


def test_scst_mid_epoch_resume_is_bit_exact(shapes_dir, tiny_run, tmp_path, monkeypatch):
    """Samples come from a generator seeded by the step (dropout from the RNGs last.pt keeps): a run stopped
    after a mid-epoch save goes on exactly as the unbroken one."""
    settings = ("train.epochs=2", "train.batch_size=4", "train.save_every=3")
    fit(scst_config(shapes_dir, tmp_path / "full", tiny_run, *settings), progress=False)
    crash_after_first_mid_epoch_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(scst_config(shapes_dir, tmp_path / "broken", tiny_run, *settings), progress=False)
    monkeypatch.undo()
    fit(None, resume=tmp_path / "broken", progress=False)
    full, resumed = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(tmp_path / "broken" / "last.pt")
    assert resumed["step"] == full["step"] > 3
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key in ("train_loss", "reward", "baseline", "val_cider"):
        assert [h[key] for h in full["history"]] == [h[key] for h in resumed["history"]], key


def test_scst_resumes_without_its_starting_checkpoint_and_refuses_another_vocabularys_statistics(shapes_dir,
                                                                                                   tiny_run, tmp_path):
    import shutil
    start = tmp_path / "xe"
    shutil.copytree(tiny_run, start)
    run = fit(scst_config(shapes_dir, tmp_path / "scst", start, "train.epochs=1"), progress=False)
    shutil.rmtree(start)                              # last.pt holds everything a resumed run needs
    fit(None, resume=run, overrides=["train.epochs=2"], progress=False)
    assert read_checkpoint(run / "last.pt")["epoch"] == 2
    df = json.loads((run / "cider_df.json").read_text())
    df["vocab_sha256"] = "0" * 64
    (run / "cider_df.json").write_text(json.dumps(df))
    with pytest.raises(ValueError, match="another vocabulary"):
        fit(None, resume=run, overrides=["train.epochs=3"], progress=False)


def test_scst_config_errors_name_the_key(shapes_dir, tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="train.init_from"):
        tiny_config(shapes_dir, tmp_path, *SCST)
    with pytest.raises(ConfigError, match="train.monitor"):
        scst_config(shapes_dir, tmp_path, tiny_run, "train.monitor=val_loss")
    with pytest.raises(ConfigError, match="train.init_from.*does not exist"):      # when the run starts
        fit(tiny_config(shapes_dir, tmp_path / "none", *SCST, f"train.init_from={tmp_path / 'nothing.pt'}"),
            progress=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ConfigError, match="scst.samples"):
        scst_config(shapes_dir, tmp_path, tiny_run, "scst.samples=1")
    with pytest.raises(ConfigError, match="scst.baseline"):
        scst_config(shapes_dir, tmp_path, tiny_run, "scst.baseline=median")
    # a model unlike the checkpoint's: found when the run starts, before anything is written
    with pytest.raises(ConfigError, match=r"model.d_model.*64.*trained with 32"):
        fit(scst_config(shapes_dir, tmp_path / "other", tiny_run, "model.d_model=64"), progress=False)
    assert not (tmp_path / "other" / "last.pt").exists()


def test_scst_non_finite_loss_stops_without_a_checkpoint(shapes_dir, tiny_run, tmp_path, monkeypatch):
    import captioning.train.scst as scst

    real = scst.policy_loss
    monkeypatch.setattr(scst, "policy_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    with pytest.raises(NonFiniteLossError, match="nan"):
        fit(scst_config(shapes_dir, tmp_path / "run", tiny_run), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_scst_on_cached_features(shapes_dir, tmp_path):
    frozen = ("model.train_backbone=false", f"data.features_dir={tmp_path / 'features'}", "train.cache_features=true")
    xe = fit(tiny_config(shapes_dir, tmp_path / "xe", *frozen, "train.epochs=1"), progress=False)
    run = fit(scst_config(shapes_dir, tmp_path / "scst", xe, *frozen, "train.epochs=1", "scst.baseline=greedy"),
              progress=False)
    row = next(csv.DictReader(open(run / "history.csv")))
    assert float(row["reward"]) >= 0 and row["baseline"] != ""


def test_plateau_schedule_drops_by_gamma_after_each_evaluation_without_improvement():
    from captioning.train.loop import TrainState, lr_factor

    cfg = tiny_config.__globals__["from_dict"]({"train": {"scheduler": "plateau", "gamma": 0.5}}, check_paths=False)
    state = TrainState()
    factor = lr_factor(cfg, steps_per_epoch=10, state=state)
    assert factor(0) == factor(35) == 1.0
    assert state.record(0.5, lower_is_better=False) and not state.record(0.4, lower_is_better=False)
    state.lr_drops += 1                      # what train._epoch does after an evaluation that did not improve
    assert factor(36) == 0.5


def test_scst_under_bf16_autocast(shapes_dir, tiny_run, tmp_path):
    run = fit(scst_config(shapes_dir, tmp_path / "scst", tiny_run, "train.epochs=1", "train.precision=bf16"),
              progress=False)
    row = next(csv.DictReader(open(run / "history.csv")))
    assert float(row["reward"]) >= 0 and float(row["val_loss"]) > 0
    assert read_checkpoint(run / "best.pt")["model"]["head.weight"].dtype == torch.float32


def test_reference_words_outside_the_vocabulary_match_no_sample():
    from captioning.train.reward import CiderD
    from captioning.train.scst import reference_ids

    vocab = Vocabulary.build(["a red circle"], min_freq=1)
    dataset = type("D", (), {"names": ["x.png"], "references": [["a zebra circle", "a red zebra"]]})()
    refs = reference_ids(dataset, vocab)["x.png"]
    zebra = refs[0][1]
    assert zebra < 0 and refs[1][2] == zebra                       # one id per unknown word, never a real one
    cider = CiderD.build({"x.png": refs})
    a, red, circle, unk = (vocab.index[w] for w in ("a", "red", "circle", "<unk>"))
    # a sampled <unk> scores as coco-caption would score the string "<unk>": it matches no reference word
    assert cider.scores([[a, unk, circle]], ["x.png"])[0] == cider.scores([[a, 999, circle]], ["x.png"])[0]


def test_init_from_a_run_directory_without_splits_warns_and_makes_them(shapes_dir, tiny_run, tmp_path, caplog):
    import shutil
    start = tmp_path / "copied"
    start.mkdir()
    shutil.copy(tiny_run / "best.pt", start / "best.pt")               # best.pt alone, without its splits.json
    cfg = tiny_config(shapes_dir, tmp_path / "scst", *SCST, f"train.init_from={start}", "train.epochs=1")
    with caplog.at_level("WARNING"):
        run = fit(cfg, progress=False)
    assert "no splits.json beside" in caplog.text
    assert json.loads((run / "splits.json").read_text()) == json.loads((tiny_run / "splits.json").read_text())
    with pytest.raises(ConfigError, match=r"data.image_size.*64.*trained with 32"):
        fit(tiny_config(shapes_dir, tmp_path / "other", *SCST, f"train.init_from={start}", "data.image_size=64"),
            progress=False)


def test_a_resumed_run_loads_its_weights_before_the_feature_cache_checks_them(shapes_dir, tmp_path, monkeypatch):
    """A pretrained encoder is built without its download on resume (the checkpoint holds it): its weights must
    be the checkpoint's before the cache compares them. Simulated: the encoder's fresh weights differ."""
    import captioning.train.init_from as train

    frozen = ("model.train_backbone=false", f"data.features_dir={tmp_path / 'features'}", "train.cache_features=true")
    run = fit(tiny_config(shapes_dir, tmp_path / "run", *frozen, "train.epochs=1"), progress=False)
    real = train.build_model

    def other_initial_weights(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(1.0)
        return model
    monkeypatch.setattr(train, "build_model", other_initial_weights)
    fit(None, resume=run, overrides=["train.epochs=2"], progress=False)
    assert read_checkpoint(run / "last.pt")["epoch"] == 2
