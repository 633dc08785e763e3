"""python -m captioning: errors that name the bad input, JSON lines in input order, exit codes."""
import json
import subprocess
import sys

import pytest

from captioning.cli.main import main
from conftest import tiny_config


@pytest.mark.parametrize("command", ["train", "caption", "evaluate", "shapes", "extract-features", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_entry_point_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "captioning", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "caption" in out.stdout


def test_bad_config_key_is_named(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model:\n  d_modl: 64\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "model.d_modl" in capsys.readouterr().err


def test_bad_override_is_named(tmp_path, capsys):
    code = main(["train", "--config", "configs/shapes.yaml", "--set", "model.num_heads=3",
                 "--set", f"run_dir={tmp_path / 'run'}"])
    assert code == 2 and "model.d_model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_missing_data_path_fails_before_anything_heavy(tmp_path, capsys):
    code = main(["train", "--config", "configs/flickr30k.yaml", "--set", f"data.images={tmp_path / 'nope'}"])
    assert code == 2 and "data.images" in capsys.readouterr().err


def test_caption_json_keeps_input_order_and_reports_bad_inputs(tiny_run, shapes_dir, tmp_path, capsys):
    good = sorted((shapes_dir / "flickr30k_images").iterdir())[:2]
    (tmp_path / "notes.txt").write_text("not an image")
    inputs = [str(good[0]), str(tmp_path / "notes.txt"), str(tmp_path / "missing.png"), str(good[1])]
    code = main(["caption", "--checkpoint", str(tiny_run / "best.pt"), "--json", "--precision", "fp32", *inputs])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [line["input"] for line in lines] == inputs
    assert "caption" in lines[0] and "caption" in lines[3]
    assert "error" in lines[1] and "notes.txt" in lines[1]["error"]
    assert "error" in lines[2] and "missing.png" in lines[2]["error"]


def test_caption_exit_status_zero_when_all_succeed(tiny_run, shapes_dir, capsys):
    good = sorted((shapes_dir / "flickr30k_images").iterdir())[:2]
    assert main(["caption", "--checkpoint", str(tiny_run / "best.pt"), *map(str, good)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_evaluate_writes_the_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["evaluate", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out), "--precision", "fp32"]) == 0
    report = json.loads(out.read_text())
    test = json.loads((tiny_run / "splits.json").read_text())["test"]
    assert [p["image"] for p in report["predictions"]] == test
    assert set(report["references"]) == set(test) and all(len(r) == 5 for r in report["references"].values())
    assert 0.0 <= report["metrics"]["shapes_accuracy"] <= 1.0
    assert "shapes_accuracy" in capsys.readouterr().out


def test_evaluate_reports_coco_metrics_and_matches_scoring_its_own_predictions(tiny_run, tmp_path, capsys):
    from captioning.eval.metrics import METRICS, score_captions

    out = tmp_path / "report.json"
    assert main(["evaluate", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out), "--precision", "fp32"]) == 0
    report = json.loads(out.read_text())
    assert set(METRICS) <= set(report["metrics"])
    # the split is scored at once: the same numbers as scoring the written predictions in one call
    predictions = {p["image"]: p["caption"] for p in report["predictions"]}
    expected, _ = score_captions(predictions, report["references"])
    for name in METRICS:
        assert report["metrics"][name] == pytest.approx(expected[name], abs=1e-12), name
    printed = capsys.readouterr().out
    assert all(f"{name}: " in printed for name in METRICS)


def test_evaluate_without_java_says_so_and_leaves_meteor_out(tiny_run, tmp_path, capsys, monkeypatch):
    import captioning.eval.metrics as metrics

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out), "--precision", "fp32"]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["METEOR"] is None and isinstance(report["metrics"]["CIDEr"], float)
    assert any("METEOR" in note for note in report["notes"])
    captured = capsys.readouterr()
    assert "METEOR: n/a" in captured.out and "note:" in captured.err


def test_extract_features_caches_every_image_once(shapes_dir, tmp_path, capsys):
    from captioning.config import save_config
    from captioning.train.feature_cache import FeatureCache

    cfg = tiny_config(shapes_dir, tmp_path / "run", "model.train_backbone=false",
                      f"data.features_dir={tmp_path / 'features'}")
    save_config(cfg, tmp_path / "cfg.yaml")
    assert main(["extract-features", "--config", str(tmp_path / "cfg.yaml"), "--batch-size", "16",
                 "--engine", "torch"]) == 0
    (folder,) = (tmp_path / "features").iterdir()
    cache = FeatureCache.open(folder)
    out = capsys.readouterr().out
    assert cache.complete and len(cache) == 48 and str(folder) in out and "(extracted by torch, " in out
    assert main(["extract-features", "--config", str(tmp_path / "cfg.yaml")]) == 0   # reused, not redone
    assert len(list((tmp_path / "features").iterdir())) == 1


def test_train_resume_auto_needs_a_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                         # nothing here to be found or started
    assert main(["train", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "auto" in err, err
    assert list(tmp_path.iterdir()) == []
    assert main(["train", "--resume", "auto", "--set", "train.epochs=3"]) == 2
    assert "--config" in capsys.readouterr().err
