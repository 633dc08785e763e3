"""Checkpoints: plain data, atomic writes, and a model rebuilt from the file alone."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from captioning.config import from_dict
from captioning.data.vocab import Vocabulary
from captioning.model.caption_model import build_model
from captioning.model.checkpoint import (
    load_checkpoint,
    model_checkpoint,
    read_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)


def _cfg():
    return from_dict({"model": {"backbone": "resnet18", "pretrained": False, "d_model": 32, "num_heads": 4,
                                "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64}},
                     check_paths=False)


def test_round_trip_outputs_differ_before_and_match_after(tmp_path):
    cfg, vocab = _cfg(), Vocabulary.build(["a red circle", "a blue square"], 1)
    torch.manual_seed(0)
    trained = build_model(cfg.model, len(vocab), vocab.pad).eval()
    save_atomic(model_checkpoint(trained, cfg, vocab, epoch=3), tmp_path / "best.pt")
    torch.manual_seed(1)
    fresh = build_model(cfg.model, len(vocab), vocab.pad).eval()
    images, tokens = torch.randn(1, 3, 64, 64), torch.tensor([[1, 4, 5, 2]])
    with torch.no_grad():
        expected = trained(tokens, images=images)
        assert not torch.allclose(fresh(tokens, images=images), expected)
        loaded, loaded_vocab, loaded_cfg = load_checkpoint(tmp_path / "best.pt")
        assert torch.equal(loaded(tokens, images=images), expected)
    assert loaded_vocab.to_list() == vocab.to_list() and loaded_cfg == cfg
    raw = torch.load(tmp_path / "best.pt", weights_only=True)   # nothing pickled beyond plain data
    assert raw["epoch"] == 3 and raw["vocab"] == vocab.to_list()


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"format_version": 1, "x": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format_version": 1, "x": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_rng_state_round_trips_through_weights_only(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    save_atomic({"format_version": 1, "rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(read_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a captioning checkpoint: .*other.pt"):
        read_checkpoint(tmp_path / "other.pt")
    torch.save({"format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 99; this version reads 1"):
        read_checkpoint(tmp_path / "future.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")


# a run directory written by version 0.1 (before data.max_words / model.max_tokens and the per-step
# schedule): `tests/data/run_v0_1`, trained for 2 epochs on Shapes(48 images, seed 0) by that version
OLD_RUN = Path(__file__).parent / "data" / "run_v0_1"


def test_a_run_directory_of_version_0_1_still_loads_captions_and_resumes(tmp_path, caplog):
    import shutil

    from captioning import Captioner
    from captioning.data.shapes import build_shapes
    from captioning.train.run import resume

    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    data = build_shapes(tmp_path / "shapes", 48, seed=0, progress=False)   # the same images it was trained on
    with caplog.at_level("WARNING"):
        model, vocab, cfg = load_checkpoint(run / "best.pt")
    assert "'data.max_len' is now 'data.max_words'" in caplog.text and str(run / "best.pt") in caplog.text
    assert (cfg.data.max_words, cfg.model.max_tokens) == (16, 20)
    result = Captioner.from_checkpoint(run / "best.pt", precision="fp32").caption([data / "flickr30k_images" /
                                                                                  "000001.png"])[0]
    assert result.ok and result.caption
    before = torch.load(run / "last.pt", weights_only=True)
    assert "gamma" in before["scheduler"]                       # version 0.1 saved ExponentialLR's state
    resume(run, [f"data.images={data / 'flickr30k_images'}", f"data.captions={data / 'results.csv'}",
                 "train.epochs=3"], progress=False)
    after = torch.load(run / "last.pt", weights_only=True)
    assert after["epoch"] == 3 and after["step"] == before["step"] * 3 // 2
    # the third epoch ran at the rate ExponentialLR(0.9) would have given it
    assert after["history"][-1]["lr"] == pytest.approx(1e-3 * 0.9 ** 2)
