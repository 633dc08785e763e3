"""train.log: tensorboard (train/tensorboard.py): event files in the run directory, read back with TensorBoard's own
reader (EventAccumulator), beside an unchanged history.csv."""
import csv
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from captioning.config import ConfigError, EnvironmentProblem
from captioning.model.checkpoint import read_checkpoint
from captioning.train import tensorboard
from captioning.train.run import resume, train
from conftest import tiny_config


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def history(run_dir) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def test_a_run_writes_what_tensorboard_reads_back_and_a_resume_carries_on(shapes_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(shapes_dir, run_dir, "train.log=tensorboard", "train.epochs=1"), progress=False)
    resume(run_dir, ["train.epochs=2"], progress=False)               # a second epoch, in new event files
    rows, acc = history(run_dir), events(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"] and (run_dir / "loss.png").is_file()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % 2 == 0   # each step once, both epochs
    per_epoch = len(steps) // 2
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert [lr[1], lr[per_epoch + 1]] == pytest.approx([float(r["lr"]) for r in rows])
    for tag, key in (("val/loss", "val_loss"), ("epoch/train_loss", "train_loss")):
        got = acc.Scalars(tag)
        assert [e.step for e in got] == [per_epoch, 2 * per_epoch]
        assert [e.value for e in got] == pytest.approx([float(r[key]) for r in rows], abs=1e-5)
    # a few validation images each epoch, and their captions as a text table
    images = [t for t in acc.Tags()["images"] if t.startswith("val/images/")]
    assert images and all(len(acc.Images(t)) == 2 for t in images)
    text = acc.Tensors("val/captions/text_summary")             # add_text's tag
    assert len(text) == 2 and b"| image | caption |" in text[-1].tensor_proto.string_val[0]
    # hparams: the config's keys, the best scores as metrics
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["model.d_model"].number_value == 32
    assert start.session_start_info.hparams["train.objective"].string_value == "xe"
    best = acc.Scalars("hparam/best_val_loss")
    assert best[-1].value == pytest.approx(min(float(r["val_loss"]) for r in rows), abs=1e-5)
    # logging changes nothing: an unbroken run without it ends with the same weights and history
    plain = train(tiny_config(shapes_dir, tmp_path / "plain", "train.epochs=2"), progress=False)
    ours, theirs = read_checkpoint(run_dir / "last.pt"), read_checkpoint(plain / "last.pt")
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in ours["model"])
    assert [r["val_loss"] for r in history(plain)] == [r["val_loss"] for r in rows]


def fake_state(step, batch, loss_sum, tokens, sums):
    return types.SimpleNamespace(step=step, batch=batch, loss_sum=loss_sum, tokens=tokens, sums=sums)


def test_per_step_loss_reward_and_baseline_come_from_the_running_totals(tmp_path, shapes_dir):
    cfg = tiny_config(shapes_dir, tmp_path / "run")
    log = tensorboard.TensorBoardLog(tmp_path / "run", cfg, fake_state(0, 0, 0.0, 0, {}))
    # an SCST epoch's running totals after each of two steps: per step loss 2.0 then 4.0, rewards 0.5 then 0.25
    log.step(fake_state(1, 1, 20.0, 10, {"reward": 5.0, "baseline": 4.0, "samples": 10}), 1e-3)
    log.step(fake_state(2, 2, 60.0, 20, {"reward": 7.5, "baseline": 6.0, "samples": 20}), 1e-3)
    log.step(fake_state(3, 1, 3.0, 3, {"reward": 0.3, "baseline": 0.0, "samples": 1}), 5e-4)   # a new epoch
    log.writer.close()
    acc = events(tmp_path / "run")
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([2.0, 4.0, 1.0])
    assert [e.value for e in acc.Scalars("scst/reward")] == pytest.approx([0.5, 0.25, 0.3])
    assert [e.value for e in acc.Scalars("scst/baseline")] == pytest.approx([0.4, 0.2, 0.0])
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3, 1e-3, 5e-4])


def test_without_the_extra_a_run_stops_before_any_work_saying_what_to_install(shapes_dir, tmp_path, monkeypatch):
    real = tensorboard.importlib.util.find_spec
    monkeypatch.setattr(tensorboard.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(EnvironmentProblem, match=r"pip install -e '\.\[tensorboard\]'"):
        train(tiny_config(shapes_dir, tmp_path / "run", "train.log=tensorboard"), progress=False)
    assert not (tmp_path / "run").exists()


def test_train_log_is_validated(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.log"):
        tiny_config(shapes_dir, tmp_path / "run", "train.log=wandb")
