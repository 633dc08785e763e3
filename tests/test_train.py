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
