"""The training loop end to end on tiny Shapes data: run directory, checkpoints, resume, NaN, learning."""
import csv
import dataclasses
import json

import pytest
import torch

from captioning import load_checkpoint
from captioning.model.checkpoint import read_checkpoint
from captioning.train.loop import NonFiniteLossError
from captioning.train.run import fit
from conftest import crash_after_first_mid_epoch_save, tiny_config


def test_run_directory_holds_everything(shapes_dir, tmp_path):
    run = fit(tiny_config(shapes_dir, tmp_path / "run"), progress=False)
    for name in ("config.yaml", "history.csv", "loss.png", "lr.png", "last.pt", "best.pt", "splits.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_cider", "reward", "baseline", "lr", "seconds"}
    assert rows[0]["val_cider"] == ""                          # monitor=val_loss (the default) skips captioning
    assert rows[0]["reward"] == rows[0]["baseline"] == ""      # objective=xe has no reward
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
    import captioning.train.run as train

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
    from captioning.data.corpus import load_splits, read_corpus
    from captioning.data.dataset import CaptionDataset
    from captioning.train.loop import val_cider

    model, vocab, cfg = load_checkpoint(tiny_run / "best.pt")
    corpus = read_corpus(cfg)
    names = load_splits(tiny_run / "splits.json")["val"]
    dataset = CaptionDataset(corpus, names, vocab, cfg.data.image_size, cfg.data.max_words)
    score = val_cider(model, dataset, vocab, cfg, "fp32", torch.device("cpu"))
    assert 0.0 <= score < 10.0
    # scoring the references themselves (one held out as the prediction) is far above a barely trained model
    from captioning.eval.metrics import score_captions
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
    import captioning.train.loop as train

    real = train.caption_loss

    def poisoned(*args, **kwargs):
        loss, n = real(*args, **kwargs)
        return loss * float("nan"), n
    monkeypatch.setattr(train, "caption_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="nan"):
        fit(tiny_config(shapes_dir, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_one_batch_overfits(shapes_dir):
    from captioning.data.corpus import read_corpus
    from captioning.data.dataset import CaptionDataset, collate
    from captioning.data.vocab import Vocabulary
    from captioning.model.caption_model import build_model
    from captioning.train.loop import caption_loss

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

    def mtime():
        return last.stat().st_mtime_ns if last.exists() else 0

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
    settings = ("train.epochs=2", "train.batch_size=4", "train.save_every=3")
    fit(tiny_config(shapes_dir, tmp_path / "full", *settings), progress=False)

    crash_after_first_mid_epoch_save(monkeypatch)
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


# --- TrainState ---------------------------------------------------------------------------------

def _state(**kwargs):
    from captioning.train.loop import TrainState
    return TrainState(**kwargs)


def test_train_state_round_trips_through_its_state_dict():
    from captioning.train.loop import TrainState

    history = [{"epoch": 1, "train_loss": 2.5, "val_loss": 2.4, "val_cider": "", "lr": 1e-3, "seconds": 3.0}]
    state = _state(epoch=3, step=42, batch=5, loss_sum=12.5, tokens=250, history=history, best=1.75, bad_epochs=2,
                   sums={"reward": 3.5, "samples": 10}, lr_drops=1, readers=2)
    saved = state.state_dict()
    # last.pt's names; epoch_sums, lr_drops and stream_readers are new (scst's rewards, scheduler=plateau,
    # data.format webdataset) and default when absent
    assert set(saved) == {"epoch", "step", "batch", "epoch_totals", "history", "best_val", "bad_epochs",
                          "epoch_sums", "lr_drops", "stream_readers"}
    assert saved["best_val"] == 1.75 and saved["epoch_totals"] == [12.5, 250]
    again = TrainState()
    again.load_state_dict(saved)
    assert again == state and isinstance(again.tokens, int)
    # through torch.save / weights_only loading, as in last.pt
    import io
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    third = TrainState()
    third.load_state_dict(torch.load(buffer, weights_only=True))
    assert third == state


def test_train_state_without_a_best_value_round_trips():
    from captioning.train.loop import TrainState

    state = _state(epoch=1, step=6)
    saved = state.state_dict()
    assert saved["best_val"] != saved["best_val"]          # NaN: a plain float, for weights_only loading
    again = TrainState(best=3.0)
    again.load_state_dict(saved)
    assert again.best is None and again == state


def test_train_state_loads_an_old_checkpoint_without_batch_or_totals():
    from captioning.train.loop import TrainState

    old = {"epoch": 4, "step": 40, "history": [{"epoch": e} for e in range(1, 5)], "best_val": 2.0, "bad_epochs": 1,
           "model": {}, "optimizer": {}}
    state = TrainState(batch=9, loss_sum=1.0, tokens=7)
    state.load_state_dict(old)
    assert (state.epoch, state.step, state.batch, state.loss_sum, state.tokens) == (4, 40, 0, 0.0, 0)
    assert state.best == 2.0 and state.bad_epochs == 1 and len(state.history) == 4
    assert state.history is not old["history"]             # a copy: the run appends to its own list


def test_record_lower_is_better_counts_bad_epochs():
    state = _state()
    assert state.record(None, lower_is_better=True) is False and state.best is None     # not evaluated
    assert state.record(3.0, lower_is_better=True) is True and (state.best, state.bad_epochs) == (3.0, 0)
    assert state.record(3.5, lower_is_better=True) is False and (state.best, state.bad_epochs) == (3.0, 1)
    assert state.record(3.0, lower_is_better=True) is False and state.bad_epochs == 2      # equal is no better
    assert state.record(None, lower_is_better=True) is False and state.bad_epochs == 2     # skipped: not counted
    assert state.record(2.0, lower_is_better=True) is True and (state.best, state.bad_epochs) == (2.0, 0)


def test_record_higher_is_better():
    state = _state()
    assert state.record(0.2, lower_is_better=False) is True
    assert state.record(0.1, lower_is_better=False) is False and (state.best, state.bad_epochs) == (0.2, 1)
    assert state.record(0.5, lower_is_better=False) is True and (state.best, state.bad_epochs) == (0.5, 0)
    assert state.record(0.0, lower_is_better=False) is False and state.best == 0.5


def _cfg(*overrides):
    from captioning.config import from_dict
    return from_dict({"data": {"format": "shapes"}}, list(overrides), check_paths=False)


def test_finished_on_epochs_and_on_patience():
    cfg = _cfg("train.epochs=5", "train.patience=2")
    assert not _state().finished(cfg)
    assert not _state(epoch=4, bad_epochs=1).finished(cfg)
    assert _state(epoch=5).finished(cfg) and _state(epoch=6).finished(cfg)
    assert _state(epoch=2, bad_epochs=2).finished(cfg)                              # stopped early
    assert not _state(epoch=2, bad_epochs=9).finished(_cfg("train.epochs=5", "train.patience=0"))   # 0 = never
    state = _state(epoch=1)
    for value in (1.0, 1.1, 1.2):
        state.record(value, lower_is_better=True)
    assert state.bad_epochs == 2 and state.finished(cfg)


# --- optimizer and schedule ------------------------------------------------------------------------

def _lrs(optimizer, scheduler, steps: int, per_epoch: int | None = None) -> list[float]:
    """The lr of each of `steps` optimizer steps; the scheduler steps after every step, or every `per_epoch`."""
    lrs = []
    for step in range(1, steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if per_epoch is None or step % per_epoch == 0:
            scheduler.step()
    return lrs


def _sgd(lr=1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_default_schedule_is_exponential_lr_stepped_once_per_epoch():
    from captioning.train.loop import build_scheduler

    cfg = _cfg("train.lr=1e-3", "train.gamma=0.9", "train.epochs=3")
    assert (cfg.train.scheduler, cfg.train.warmup_steps) == ("exponential", 0)        # the defaults
    optimizer = _sgd()
    new = _lrs(optimizer, build_scheduler(cfg, optimizer, steps_per_epoch=4), 12)
    reference = _sgd()
    old = _lrs(reference, torch.optim.lr_scheduler.ExponentialLR(reference, gamma=0.9), 12, per_epoch=4)
    assert new == pytest.approx(old, rel=1e-12, abs=0)
    assert new[3] == new[0] == 1e-3 and new[4] == pytest.approx(9e-4, rel=1e-12)   # changes at epoch ends only
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.9 ** 3, rel=1e-12)


def test_warmup_ramps_linearly_then_follows_the_schedule():
    from captioning.train.loop import build_scheduler

    lr, warmup, per_epoch = 1e-3, 6, 4
    cfg = _cfg(f"train.lr={lr}", "train.gamma=0.5", "train.epochs=4", f"train.warmup_steps={warmup}")
    optimizer = _sgd(lr)
    lrs = _lrs(optimizer, build_scheduler(cfg, optimizer, per_epoch), 16)
    for step, value in enumerate(lrs):
        expected = lr * 0.5 ** (step // per_epoch) * min(1.0, (step + 1) / warmup)
        assert value == pytest.approx(expected, rel=1e-12), step
    ramp = [lr * (k + 1) / warmup for k in range(4)]                   # epoch 1: a straight line up from lr/6
    assert lrs[:4] == pytest.approx(ramp, rel=1e-12) and lrs[0] > 0
    assert lrs[warmup:] == pytest.approx([lr * 0.5 ** (s // per_epoch) for s in range(warmup, 16)], rel=1e-12)


def test_cosine_decays_to_zero_and_is_monotone_after_warmup():
    from captioning.train.loop import build_scheduler

    lr, warmup, per_epoch, epochs = 1e-3, 5, 4, 5
    cfg = _cfg(f"train.lr={lr}", "train.scheduler=cosine", f"train.epochs={epochs}", f"train.warmup_steps={warmup}")
    optimizer = _sgd(lr)
    scheduler = build_scheduler(cfg, optimizer, per_epoch)
    lrs = _lrs(optimizer, scheduler, epochs * per_epoch)
    assert lrs[:warmup] == pytest.approx([lr * (k + 1) / warmup for k in range(warmup)], rel=1e-12)
    assert lrs[warmup] == pytest.approx(lr, rel=1e-12)
    after = lrs[warmup - 1:]
    assert all(a >= b for a, b in zip(after, after[1:])), after
    assert after[-1] < 0.05 * lr and after[-2] > after[-1] > 0           # near 0 by the last step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)   # and 0 after it
    # without warmup: full lr at the first step, the cosine's midpoint at half of all steps
    optimizer = _sgd(lr)
    plain = _lrs(optimizer, build_scheduler(_cfg(f"train.lr={lr}", "train.scheduler=cosine", "train.epochs=5"),
                                            optimizer, per_epoch), 20)
    assert plain[0] == lr and plain[10] == pytest.approx(lr / 2, rel=1e-12)


def test_build_optimizer_adam_or_adamw_with_weight_decay():
    from captioning.model.caption_model import build_model
    from captioning.train.loop import build_optimizer

    small = ("model.backbone=resnet18", "model.pretrained=false", "model.d_model=32", "model.num_heads=4",
             "model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.dim_feedforward=64",
             "model.train_backbone=false", "train.lr=3e-4")
    cfg = _cfg(*small, "train.optimizer=adamw", "train.weight_decay=0.05")
    model = build_model(cfg.model, 20)
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == 0.05 and group["lr"] == 3e-4
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(group["params"]) == len(trainable) < len(list(model.parameters()))   # the frozen encoder left out
    adam = build_optimizer(_cfg(*small), model)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 0.0


def test_old_exponential_lr_state_continues_with_the_old_runs_lr():
    """last.pt from before build_scheduler: ExponentialLR's state after 2 epochs of 4 steps."""
    from captioning.train.loop import build_scheduler, load_scheduler_state

    lr, gamma, per_epoch = 1e-3, 0.8, 4
    old_opt = _sgd(lr)
    old_sched = torch.optim.lr_scheduler.ExponentialLR(old_opt, gamma)
    _lrs(old_opt, old_sched, 2 * per_epoch, per_epoch=per_epoch)
    saved_opt, saved_sched = old_opt.state_dict(), old_sched.state_dict()
    assert "gamma" in saved_sched and saved_sched["last_epoch"] == 2
    expected = _lrs(old_opt, old_sched, 2 * per_epoch, per_epoch=per_epoch)      # epochs 3 and 4 of the old run

    cfg = _cfg(f"train.lr={lr}", f"train.gamma={gamma}", "train.epochs=4")
    optimizer = _sgd(lr)
    scheduler = build_scheduler(cfg, optimizer, per_epoch)
    optimizer.load_state_dict(saved_opt)
    load_scheduler_state(scheduler, saved_sched, step=2 * per_epoch)
    assert scheduler.last_epoch == 2 * per_epoch
    got = _lrs(optimizer, scheduler, 2 * per_epoch)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx([lr * gamma ** 2] * 4 + [lr * gamma ** 3] * 4, rel=1e-12)
    # and its own state saves and loads again (the next resume)
    again = build_scheduler(cfg, _sgd(lr), per_epoch)
    load_scheduler_state(again, scheduler.state_dict(), step=4 * per_epoch)
    assert again.last_epoch == 4 * per_epoch


# --- label smoothing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_images(shapes_dir):
    from captioning.data.corpus import read_corpus
    from captioning.data.dataset import CaptionDataset, collate
    from captioning.data.vocab import Vocabulary
    from captioning.model.caption_model import build_model

    torch.manual_seed(0)
    cfg = tiny_config(shapes_dir, "unused", "model.dropout=0.0")
    corpus = read_corpus(cfg)
    names = sorted(corpus.captions)[:4]
    vocab = Vocabulary.build((c for n in names for c in corpus.captions[n]), 1)
    dataset = CaptionDataset(corpus, names, vocab, 32, 16)
    model = build_model(cfg.model, len(vocab), vocab.pad).eval()
    return model, dataset, collate([dataset[i] for i in range(4)], vocab.pad), vocab


def test_caption_loss_is_cross_entropy_and_label_smoothing_changes_it(four_images):
    import torch.nn.functional as F

    from captioning.train.loop import caption_loss

    model, _, batch, vocab = four_images
    cpu = torch.device("cpu")
    with torch.no_grad():
        plain, n = caption_loss(model, batch, "fp32", cpu)
        smoothed, n_smoothed = caption_loss(model, batch, "fp32", cpu, label_smoothing=0.1)
        logits = model(batch.tokens[:, :-1], batch.image_index, images=batch.images)
    targets = batch.tokens[:, 1:]
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=vocab.pad)
    assert plain.item() == pytest.approx(expected.item(), rel=1e-6)
    assert n == n_smoothed == int((targets != vocab.pad).sum()) > 0
    assert abs(smoothed.item() - plain.item()) > 1e-4
    smoothed_expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=vocab.pad,
                                        label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(smoothed_expected.item(), rel=1e-6)


def test_label_smoothing_reaches_the_training_loss_only(four_images, monkeypatch):
    import captioning.train.loop as train
    from captioning.data.dataset import build_loader
    from captioning.model.caption_model import build_model

    model, dataset, _, vocab = four_images
    seen = []
    real = train.caption_loss

    def spy(model, batch, precision, device, label_smoothing=0.0):
        seen.append(label_smoothing)
        return real(model, batch, precision, device, label_smoothing)
    monkeypatch.setattr(train, "caption_loss", spy)
    net = build_model(dataclasses.replace(model.cfg, train_backbone=False), len(vocab), vocab.pad)   # fast
    cfg = _cfg("train.lr=1e-4")
    optimizer = train.build_optimizer(cfg, net)
    loader = build_loader(dataset, batch_size=2, shuffle=True, num_workers=0, pad_id=vocab.pad)
    stats = train.train_one_epoch(net, loader, optimizer, train.build_scheduler(cfg, optimizer, len(loader)),
                                  torch.amp.GradScaler("cpu", enabled=False), train.TrainState(), precision="fp32",
                                  device=torch.device("cpu"), label_smoothing=0.2, progress=False)
    assert seen == [0.2, 0.2] and stats["steps"] == 2
    seen.clear()
    train.evaluate_loss(net, build_loader(dataset, batch_size=2, shuffle=False, num_workers=0, pad_id=vocab.pad),
                        "fp32", torch.device("cpu"))
    assert seen == [0.0, 0.0]


# --- run directory, --resume auto, old checkpoints ------------------------------------------------------

def test_every_run_writes_env_json(tiny_run):
    from captioning.env import KEYS

    env = json.loads((tiny_run / "env.json").read_text())
    assert set(env) == set(KEYS), set(env) ^ set(KEYS)
    assert env["device"] == "cpu" and env["precision"] == "fp32" and env["torch"] == torch.__version__


def test_train_or_resume_of_a_finished_run_returns_at_once(tiny_run, caplog):
    import logging

    from captioning.config import from_dict
    from captioning.train.run import train_or_resume

    last = tiny_run / "last.pt"
    before = (last.stat().st_mtime_ns, read_checkpoint(last)["step"])
    cfg = from_dict(read_checkpoint(last)["config"])
    assert cfg.run_dir == str(tiny_run) and cfg.train.epochs == 1
    with caplog.at_level(logging.INFO, logger="captioning.train"):
        assert train_or_resume(cfg, progress=False) == tiny_run
    assert (last.stat().st_mtime_ns, read_checkpoint(last)["step"]) == before       # nothing trained, nothing written
    assert any("finished" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def _run_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "captioning", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_train_resume_auto_starts_then_finds_finished_then_continues(shapes_dir, tmp_path):
    from captioning.config import save_config

    save_config(tiny_config(shapes_dir, tmp_path / "run", "train.epochs=1"), tmp_path / "run.yaml")
    last = tmp_path / "run" / "last.pt"

    first = _run_cli("--config", tmp_path / "run.yaml", "--resume", "auto")
    assert first.returncode == 0, first.stderr[-2000:]
    assert last.is_file() and read_checkpoint(last)["epoch"] == 1

    stamp = last.stat().st_mtime_ns
    second = _run_cli("--config", tmp_path / "run.yaml", "--resume", "auto")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "finished" in second.stdout + second.stderr, second.stdout + second.stderr
    assert last.stat().st_mtime_ns == stamp                                      # nothing trained again

    third = _run_cli("--config", tmp_path / "run.yaml", "--resume", "auto", "--set", "train.epochs=3")
    assert third.returncode == 0, third.stderr[-2000:]
    ckpt = read_checkpoint(last)
    assert ckpt["epoch"] == 3 and [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]
    assert ckpt["config"]["train"]["epochs"] == 3


@pytest.mark.slow
def test_resume_of_an_old_format_checkpoint(tiny_run, tmp_path):
    """last.pt as older versions wrote it: ExponentialLR's scheduler state, max_len keys, no batch/epoch_totals."""
    import shutil

    from captioning.train.run import resume

    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    ckpt = read_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 1
    lr = ckpt["config"]["train"]["lr"]
    gamma = ckpt["config"]["train"]["gamma"]
    optimizer = _sgd(lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    _lrs(optimizer, scheduler, ckpt["step"], per_epoch=ckpt["step"])              # one epoch, stepped once
    ckpt["scheduler"] = scheduler.state_dict()
    ckpt["config"]["data"]["max_len"] = ckpt["config"]["data"].pop("max_words")
    ckpt["config"]["model"]["max_len"] = ckpt["config"]["model"].pop("max_tokens")
    del ckpt["batch"], ckpt["epoch_totals"]
    torch.save(ckpt, run / "last.pt")

    assert resume(run, ["train.epochs=2"], progress=False) == run
    after = read_checkpoint(run / "last.pt")
    assert after["epoch"] == 2 and after["step"] == 2 * ckpt["step"]
    assert [h["epoch"] for h in after["history"]] == [1, 2]
    assert after["history"][1]["lr"] == pytest.approx(lr * gamma, rel=1e-12)     # what the old run would have used
    assert after["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr * gamma ** 2, rel=1e-12)
    assert "gamma" not in after["scheduler"]
    assert "max_words" in after["config"]["data"] and "max_len" not in after["config"]["data"]


def test_resume_refuses_overrides_that_would_not_apply_and_auto_drops_them(tiny_run, tmp_path, caplog):
    import shutil

    from captioning.config import ConfigError, load_config
    from captioning.train.run import RESUME_KEYS, resume, train_or_resume

    run = shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="train.batch_size.*a resumed run keeps"):
        resume(run, ["train.batch_size=4"], progress=False)
    assert "train.epochs" in RESUME_KEYS and "train.lr" not in RESUME_KEYS
    # --resume auto: the job script's own --set (the first start's) does not stop the restart
    cfg = load_config(run / "config.yaml", [f"run_dir={run}", "train.lr=0.5"])
    with caplog.at_level("WARNING"):
        assert train_or_resume(cfg, ["train.lr=0.5"], progress=False) == run
    assert "train.lr" in caplog.text
