"""Checkpoints: plain data, atomic writes, and a model rebuilt from the file alone."""
import random

import numpy as np
import pytest
import torch

from captioning.checkpoint import load_checkpoint, model_checkpoint, read_checkpoint, rng_state, save_atomic, set_rng_state
from captioning.config import from_dict
from captioning.model import build_model
from captioning.vocab import Vocabulary


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
        expected = trained(images, tokens)
        assert not torch.allclose(fresh(images, tokens), expected)
        loaded, loaded_vocab, loaded_cfg = load_checkpoint(tmp_path / "best.pt")
        assert torch.equal(loaded(images, tokens), expected)
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
    with pytest.raises(ValueError, match="format version"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
