"""The training loop end to end on tiny Shapes data: run directory, checkpoints, resume, NaN, learning."""
import csv
import json

import pytest
import torch

from captioning import load_checkpoint
from captioning.checkpoint import read_checkpoint
from captioning.train import NonFiniteLossError, fit
from conftest import tiny_config


def test_run_directory_holds_everything(shapes_dir, tmp_path):
    run = fit(tiny_config(shapes_dir, tmp_path / "run"), progress=False)
    for name in ("config.yaml", "history.csv", "loss.png", "lr.png", "last.pt", "best.pt", "splits.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_cider", "lr", "seconds"}
    assert rows[0]["val_cider"] == ""                          # monitor=val_loss (the default) skips captioning
    assert float(rows[1]["lr"]) == pytest.approx(1e-3 * 0.9)   # ExponentialLR stepped once per epoch
    splits = json.loads((run / "splits.json").read_text())
    names = [set(splits[s]) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(map(len, names)) == 48
    # both checkpoints load as plain data, and the model is rebuilt from the file alone
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        assert isinstance(ckpt["vocab"], list) and isinstance(ckpt["config"], dict)
    model, vocab, cfg = load_checkpoint(run / "best.pt")
    assert cfg.model.d_model == 32 and len(vocab) == model.head.out_features


def test_monitor_cider_picks_best_pt_by_validation_cider(shapes_dir, tmp_path, monkeypatch):
    import captioning.train as train

    scores = iter([0.2, 0.5])               # the val CIDEr of the epochs it is computed on

    def fake_cider(*args):
        return next(scores)
    monkeypatch.setattr(train, "val_cider", fake_cider)
    run = fit(tiny_config(shapes_dir, tmp_path / "run", "train.epochs=4", "train.monitor=cider",
                          "train.eval_every=2"), progress=False)
    rows = list(csv.DictReader(open(run / "history.csv")))
    # every 2nd epoch and the last: epochs 2 and 4
    assert [r["val_cider"] for r in rows] == ["", "0.2", "", "0.5"]
    best = read_checkpoint(run / "best.pt")
    assert best["epoch"] == 4 and best["val_cider"] == 0.5
    assert (run / "cider.png").is_file()


def test_val_cider_scores_greedy_captions_of_the_val_split(tiny_run):
    from captioning.data import CaptionDataset, load_splits, read_corpus
    from captioning.train import val_cider

    model, vocab, cfg = load_checkpoint(tiny_run / "best.pt")
    corpus = read_corpus(cfg)
    names = load_splits(tiny_run / "splits.json")["val"]
    dataset = CaptionDataset(corpus, names, vocab, cfg.data.image_size, cfg.data.max_len)
    score = val_cider(model, dataset, vocab, cfg, "fp32", torch.device("cpu"))
    assert 0.0 <= score < 10.0
    # scoring the references themselves (one held out as the prediction) is far above a barely trained model
    from captioning.metrics import score_captions
    refs = {n: corpus.captions[n] for n in names}
    perfect = score_captions({n: c[0] for n, c in refs.items()}, refs, metrics=("CIDEr",))[0]["CIDEr"]
    assert perfect > score


def test_existing_run_is_not_overwritten(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, tmp_path / "run", "train.epochs=1")
    fit(cfg, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        fit(cfg, progress=False)


def test_resume_ends_where_an_unbroken_run_ends(shapes_dir, tmp_path):
    fit(tiny_config(shapes_dir, tmp_path / "full", "train.epochs=3"), progress=False)
    fit(tiny_config(shapes_dir, tmp_path / "broken", "train.epochs=1"), progress=False)
    fit(None, resume=tmp_path / "broken", overrides=["train.epochs=3"], progress=False)
    full, resumed = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(tmp_path / "broken" / "last.pt")
    assert resumed["epoch"] == full["epoch"] == 3
    assert resumed["step"] == full["step"] > 0 and full["step"] % 3 == 0   # the same steps in every epoch
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]


def test_non_finite_loss_stops_without_a_checkpoint(shapes_dir, tmp_path, monkeypatch):
    import captioning.train as train

    real = train.caption_loss

    def poisoned(*args, **kwargs):
        loss, n = real(*args, **kwargs)
        return loss * float("nan"), n
    monkeypatch.setattr(train, "caption_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="nan"):
        fit(tiny_config(shapes_dir, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_one_batch_overfits(shapes_dir):
    from captioning.data import CaptionDataset, collate, read_corpus
    from captioning.model import build_model
    from captioning.train import caption_loss
    from captioning.vocab import Vocabulary

    torch.manual_seed(0)
    cfg = tiny_config(shapes_dir, "unused", "model.dropout=0.0")
    corpus = read_corpus(cfg)
    names = sorted(corpus.captions)[:4]
    vocab = Vocabulary.build((c for n in names for c in corpus.captions[n]), 1)
    batch = collate([CaptionDataset(corpus, names, vocab, 32, 16)[i] for i in range(4)], vocab.pad)
    model = build_model(cfg.model, len(vocab), vocab.pad)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    first = None
    for _ in range(150):
        loss, _ = caption_loss(model, batch, "fp32", torch.device("cpu"))
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # 4 images x 5 captions: the loss cannot reach 0 (captions of one image differ) but falls far
    assert first > 2.5 and loss.item() < 0.6


def _train_cli(*args):
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-m", "captioning", "train", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bit_exact(shapes_dir, tmp_path):
    """kill -9 a CPU training run several times mid-epoch; `train --resume` each time; the final
    weights and history equal an uninterrupted run's bit for bit (last.pt written every step)."""
    import random
    import time

    from captioning.config import save_config

    settings = ("train.epochs=4", "train.batch_size=4", "train.save_every=1", "model.dropout=0.1")
    for name in ("full", "killed"):
        save_config(tiny_config(shapes_dir, tmp_path / name, *settings), tmp_path / f"{name}.yaml")
    assert _train_cli("--config", tmp_path / "full.yaml").wait() == 0

    rng, interrupted, last = random.Random(0), 0, tmp_path / "killed" / "last.pt"
    mtime = lambda: last.stat().st_mtime_ns if last.exists() else 0
    proc = _train_cli("--config", tmp_path / "killed.yaml")
    for _ in range(4):
        # once this process has saved a step of its own, kill it at a random moment of the next ones
        before = mtime()
        while proc.poll() is None and mtime() == before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.kill()                                              # SIGKILL: no handler, no cleanup
            interrupted += 1
        proc.wait()
        proc = _train_cli("--resume", tmp_path / "killed") if last.exists() else \
            _train_cli("--config", tmp_path / "killed.yaml")
    assert proc.wait() == 0
    assert interrupted >= 3, "the kills came too late to interrupt training: the test proved nothing"

    full, resumed = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(tmp_path / "killed" / "last.pt")
    assert resumed["epoch"] == full["epoch"] == 4 and resumed["step"] == full["step"]
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in full["history"]] == [h[key] for h in resumed["history"]]


def test_mid_epoch_checkpoint_resumes_with_the_next_batch(shapes_dir, tmp_path, monkeypatch):
    """A run stopped right after a mid-epoch save goes on exactly as the unbroken run did."""
    import captioning.train as train

    settings = ("train.epochs=2", "train.batch_size=4", "train.save_every=3")
    fit(tiny_config(shapes_dir, tmp_path / "full", *settings), progress=False)

    real_save = train.save_atomic

    def crash_after_first_mid_epoch_save(obj, path):
        real_save(obj, path)
        if obj.get("batch"):
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_atomic", crash_after_first_mid_epoch_save)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(shapes_dir, tmp_path / "broken", *settings), progress=False)
    monkeypatch.undo()
    saved = read_checkpoint(tmp_path / "broken" / "last.pt")
    assert saved["epoch"] == 0 and saved["batch"] == 3 and saved["step"] == 3
    fit(None, resume=tmp_path / "broken", progress=False)
    full, resumed = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(tmp_path / "broken" / "last.pt")
    assert resumed["step"] == full["step"]
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]


def test_training_on_cached_features_matches_training_on_images(shapes_dir, tmp_path):
    frozen = ("model.train_backbone=false", "model.dropout=0.0", f"data.features_dir={tmp_path / 'features'}")
    plain = fit(tiny_config(shapes_dir, tmp_path / "plain", *frozen), progress=False)
    cached = fit(tiny_config(shapes_dir, tmp_path / "cached", *frozen, "train.cache_features=true"), progress=False)
    assert len(list((tmp_path / "features").iterdir())) == 1               # one cache, keyed
    rows = [list(csv.DictReader(open(run / "history.csv"))) for run in (plain, cached)]
    for a, b in zip(*rows):   # fp16 features: the same run within fp16 noise
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=2e-3)
        assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=2e-3)


def test_cache_features_needs_a_frozen_encoder(shapes_dir, tmp_path):
    from captioning.config import ConfigError
    with pytest.raises(ConfigError, match="train.cache_features"):
        tiny_config(shapes_dir, tmp_path, "train.cache_features=true", "model.train_backbone=true")


def test_bf16_training_on_the_cpu_learns_like_fp32(shapes_dir, tmp_path):
    runs = {p: fit(tiny_config(shapes_dir, tmp_path / p, "train.epochs=1", f"train.precision={p}"), progress=False)
            for p in ("fp32", "bf16")}
    loss = {p: float(next(csv.DictReader(open(run / "history.csv")))["train_loss"]) for p, run in runs.items()}
    assert loss["bf16"] == pytest.approx(loss["fp32"], rel=0.05)     # bf16 autocast: the same run, roughly
    assert read_checkpoint(runs["bf16"] / "best.pt")["model"]["head.weight"].dtype == torch.float32   # fp32 master


def test_fp16_needs_cuda(shapes_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        fit(tiny_config(shapes_dir, tmp_path / "run", "train.precision=fp16"), progress=False)
