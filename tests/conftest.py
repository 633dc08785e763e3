"""Shared fixtures: a tiny Shapes data set, a tiny config, and a tiny trained run."""
import pytest

from captioning.config import from_dict
from captioning.data.shapes import build_shapes


def tiny_config(data_dir, run_dir, *overrides):
    """A config small enough to train in seconds on 2 CPU cores."""
    raw = {"run_dir": str(run_dir), "seed": 0,
           "data": {"format": "shapes", "images": str(data_dir / "flickr30k_images"),
                    "captions": str(data_dir / "results.csv"), "image_size": 32, "min_freq": 1,
                    "max_words": 16, "val_fraction": 0.2, "test_fraction": 0.1},
           "model": {"backbone": "resnet18", "pretrained": False, "train_backbone": True, "d_model": 32,
                     "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64,
                     "dropout": 0.1, "max_tokens": 20},
           "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "gamma": 0.9, "patience": 0,
                     "precision": "fp32", "num_workers": 0, "device": "cpu"}}
    return from_dict(raw, list(overrides))


def crash_after_first_mid_epoch_save(monkeypatch) -> None:
    """Make training raise KeyboardInterrupt right after it writes its first mid-epoch last.pt."""
    import captioning.train.run as train
    real_save = train.save_atomic

    def save_then_crash(obj, path):
        real_save(obj, path)
        if obj.get("batch"):
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_atomic", save_then_crash)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    return build_shapes(tmp_path_factory.mktemp("shapes"), 48, seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_run(shapes_dir, tmp_path_factory):
    """A run directory trained for one epoch (the weights are barely trained: for plumbing tests)."""
    from captioning.train.run import fit
    return fit(tiny_config(shapes_dir, tmp_path_factory.mktemp("runs") / "tiny", "train.epochs=1"), progress=False)
