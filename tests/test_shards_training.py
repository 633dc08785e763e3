"""Training from WebDataset shards beyond the stream itself: the frozen-encoder feature cache as feature shards,
`evaluate` of a run trained from shards, and kill -9 of a streamed run in a subprocess."""
import csv
import io
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from captioning.config import save_config
from captioning.data.dataset import build_transform
from captioning.data.images import open_image
from captioning.data.shards import iter_samples, write_shards
from captioning.data.stream import prepare_stream
from captioning.model.checkpoint import read_checkpoint
from captioning.train import feature_shards
from captioning.train.feature_cache import build_encoder
from captioning.train.run import fit
from conftest import crash_after_first_mid_epoch_save, tiny_config

pytest.importorskip("webdataset")

# stride 8 at 32 px: a 4x4 grid of resnet18's 128 layer2 channels
FROZEN = ("model.train_backbone=false", "model.backbone_stages=2", "model.dropout=0")


@pytest.fixture(scope="module")
def shards_dir(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(tiny_config(shapes_dir, out / "unused"), out, shard_size=10, progress=False)
    return out


@pytest.fixture
def shards(shards_dir, tmp_path):
    """A copy of the shards of this test's own: feature shards are written beside them."""
    to = tmp_path / "shards"
    to.mkdir()
    for f in [*shards_dir.glob("*.tar"), shards_dir / "index.json"]:
        shutil.copy(f, to / f.name)
    return to


def stream_config(shapes_dir, shards, run_dir, *overrides):
    return tiny_config(shapes_dir, run_dir, "data.format=webdataset", f"data.shards={shards}",
                       "data.shuffle_buffer=6", *overrides)


def history(run_dir, *keys) -> list[tuple]:
    return [tuple(row[k] for k in keys) for row in csv.DictReader(open(run_dir / "history.csv"))]


def no_images(monkeypatch):
    """Make running the encoder or decoding an image of the stream fail."""
    def fail(*args, **kwargs):
        raise AssertionError("an image was decoded or the encoder ran: the feature shards were not used")
    monkeypatch.setattr(feature_shards, "Extractor", fail)
    monkeypatch.setattr("captioning.data.stream.open_image", fail)


# --- the feature cache as feature shards -------------------------------------------------------------

def test_cache_features_from_shards_trains_as_on_images_and_later_runs_and_resumes_reuse_them(
        shapes_dir, shards, tmp_path, monkeypatch):
    settings = ("train.epochs=2", "train.batch_size=4", "train.save_every=3", *FROZEN)
    plain = fit(stream_config(shapes_dir, shards, tmp_path / "plain", *settings), progress=False)
    cached = fit(stream_config(shapes_dir, shards, tmp_path / "cached", *settings, "train.cache_features=true"),
                 progress=False)
    losses = ("train_loss", "val_loss")
    for a, b in zip(history(plain, *losses), history(cached, *losses)):   # fp16 features: within fp16 noise
        assert float(b[0]) == pytest.approx(float(a[0]), rel=2e-3)
        assert float(b[1]) == pytest.approx(float(a[1]), rel=2e-3)

    # beside the image shards, keyed; the same samples shard for shard, key for key: features for images
    folder, = (shards / "features").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [      # .lock: one writer at a time
        ".lock", "features.json", "index.json", *(f"train-00000{i}.tar" for i in range(4)), "val-000000.tar"]
    for shard in ("train-000003.tar", "val-000000.tar"):
        images, features = list(iter_samples(str(shards / shard))), list(iter_samples(str(folder / shard)))
        assert [(k, m) for k, _, _, m in images] == [(k, m) for k, _, _, m in features]
        assert {ext for _, _, ext, _ in features} == {"npy"}
        grid = np.load(io.BytesIO(features[0][1]))
        assert grid.shape == (16, 128) and grid.dtype == np.float16
    index = json.loads((folder / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 33 and index["splits"]["val"]["samples"] == 10

    # later runs find them: a run stopped after a mid-epoch save and resumed, the encoder never running and no
    # image decoded, ends bit for bit where the unbroken cached run ended
    no_images(monkeypatch)
    crash_after_first_mid_epoch_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(stream_config(shapes_dir, shards, tmp_path / "broken", *settings, "train.cache_features=true"),
            progress=False)
    assert read_checkpoint(tmp_path / "broken" / "last.pt")["batch"] == 3
    monkeypatch.undo()
    no_images(monkeypatch)
    fit(None, resume=tmp_path / "broken", progress=False)
    full, resumed = read_checkpoint(cached / "last.pt"), read_checkpoint(tmp_path / "broken" / "last.pt")
    assert resumed["step"] == full["step"] == 16
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert history(cached, *losses) == history(tmp_path / "broken", *losses)
    assert len(list((shards / "features").iterdir())) == 1


def test_a_killed_feature_shard_writer_leaves_no_index_and_the_next_writes_only_the_rest(
        shapes_dir, shards, tmp_path, monkeypatch):
    cfg = stream_config(shapes_dir, shards, tmp_path / "run", *FROZEN)
    _, splits, _ = prepare_stream(cfg, tmp_path / "run", None)
    encoder, real_write, written = build_encoder(cfg), feature_shards.write_shard, []

    def write_then_die(path, samples):
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(path, samples)
        written.append(path.name)
    monkeypatch.setattr(feature_shards, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        feature_shards.feature_streams(cfg, splits, encoder, device=torch.device("cpu"), precision="fp32",
                                       progress=False, batch_size=8)
    folder, = (shards / "features").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "features.json", "train-000000.tar",
                                                        "train-000001.tar"]

    monkeypatch.setattr(feature_shards, "write_shard", real_write)
    real_call, extracted = feature_shards.Extractor.__call__, []

    def counting(self, images):
        extracted.append(len(images))
        return real_call(self, images)
    monkeypatch.setattr(feature_shards.Extractor, "__call__", counting)
    cfg.train.num_workers = 2          # two readers: their shards end in any order
    streams = feature_shards.feature_streams(cfg, splits, encoder, device=torch.device("cpu"), precision="fp32",
                                             progress=False, batch_size=8)
    assert sum(extracted) == 43 - 20 and (folder / "index.json").is_file()
    assert streams["train"].features and streams["train"].shards[0] == str(folder / "train-000000.tar")
    # each sample's features are its own image's (no row is off by one), the resumed shards' as the first ones'
    transform = build_transform(cfg.data.image_size)
    for shard in ("train-000000.tar", "train-000003.tar", "val-000000.tar"):
        features = {k: np.load(io.BytesIO(d)) for k, d, _, _ in iter_samples(str(folder / shard))}
        images = {k: transform(open_image(d)) for k, d, _, _ in iter_samples(str(shards / shard))}
        with torch.no_grad():
            expected = encoder(torch.stack(list(images.values())))
        assert list(features) == list(images)
        torch.testing.assert_close(torch.from_numpy(np.stack(list(features.values()))).float(), expected,
                                   rtol=1e-3, atol=1e-3)


# --- evaluate -----------------------------------------------------------------------------------------

def test_evaluate_scores_a_run_trained_from_shards_on_its_splits_shards(shapes_dir, shards_dir, tmp_path,
                                                                       monkeypatch):
    from captioning.cli.main import main
    from captioning.eval.evaluate import evaluate

    monkeypatch.setattr("captioning.eval.metrics.java_available", lambda: False)   # seconds faster a call
    run = fit(stream_config(shapes_dir, shards_dir, tmp_path / "run", "train.epochs=1"), progress=False)
    options = {"java": False, "progress": False, "engine": "torch", "precision": "fp32"}
    report = evaluate(run / "best.pt", split="test", **options)
    index = json.loads((shards_dir / "index.json").read_text())
    test = index["splits"]["test"]["names"]
    assert report["metrics"]["images"] == len(test) == 5
    assert [p["image"] for p in report["predictions"]] == test
    # the same images from the folder they were written from give the same report
    folder = evaluate(run / "best.pt", split="test", overrides=["data.format=shapes"], **options)
    assert folder["predictions"] == report["predictions"] and folder["references"] == report["references"]
    assert folder["metrics"] == report["metrics"]
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--split", "val", "--engine", "torch",
                 "--out", str(tmp_path / "val.json")]) == 0
    val = json.loads((tmp_path / "val.json").read_text())
    assert [p["image"] for p in val["predictions"]] == index["splits"]["val"]["names"]


# --- kill -9 ------------------------------------------------------------------------------------------

def _train_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "captioning", "train", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_streamed_run_killed_9_after_a_mid_epoch_save_resumes_to_the_unbroken_runs_weights(
        shapes_dir, shards_dir, tmp_path):
    settings = ("train.epochs=2", "train.batch_size=4", "train.save_every=1")
    for name in ("full", "killed"):
        save_config(stream_config(shapes_dir, shards_dir, tmp_path / name, *settings), tmp_path / f"{name}.yaml")
    full = _train_cli("--config", tmp_path / "full.yaml")
    last = tmp_path / "killed" / "last.pt"
    proc = _train_cli("--config", tmp_path / "killed.yaml")
    while proc.poll() is None and not last.exists():      # its first save: after step 1 of epoch 1
        time.sleep(0.01)
    proc.kill()                                          # SIGKILL: no handler, no cleanup
    assert proc.wait() == -9, "the run ended before the kill: the test proved nothing"
    saved = read_checkpoint(last)
    assert saved["step"] < 16 and saved["stream_readers"] == 1
    assert _train_cli("--resume", tmp_path / "killed").wait() == 0 and full.wait() == 0
    full, resumed = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(last)
    assert resumed["epoch"] == full["epoch"] == 2 and resumed["step"] == full["step"] == 16
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in full["history"]] == [h[key] for h in resumed["history"]]
