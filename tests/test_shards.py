"""WebDataset shards: the `shards` command, the stream training reads (local and over http), exact
resume from the middle of a streamed epoch, check-data on shards, and the config keys."""
import contextlib
import functools
import http.server
import json
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from captioning.cli.main import main
from captioning.config import ConfigError, EnvironmentProblem, load_config
from captioning.data.corpus import make_splits, read_corpus
from captioning.data.shards import SHARD_NAME, find_shards, iter_samples, write_shards
from captioning.data.stream import build_stream_loader, prepare_stream, resume_point, taken_per_reader
from captioning.data.vocab import Vocabulary
from captioning.model.checkpoint import read_checkpoint
from captioning.train.run import fit
from conftest import crash_after_first_mid_epoch_save, tiny_config

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards_dir(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    cfg = tiny_config(shapes_dir, out / "unused")
    assert main(["shards", "--config", str(_write_config(cfg, out / "shapes.yaml")), "--out", str(out),
                 "--shard-size", "10"]) == 0
    return out


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(asdict(cfg)))
    return path


def stream_config(shapes_dir, shards, run_dir, *overrides):
    return tiny_config(shapes_dir, run_dir, "data.format=webdataset", f"data.shards={shards}",
                       "data.shuffle_buffer=6", *overrides)


@contextlib.contextmanager
def serving(folder: Path):
    """An http.server on 127.0.0.1, a free port, serving `folder`; its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- writing ---------------------------------------------------------------------------------------

def test_shards_hold_every_split_with_the_original_bytes_and_an_index(shapes_dir, shards_dir):
    cfg = tiny_config(shapes_dir, shards_dir / "unused")
    corpus = read_corpus(cfg)
    splits = make_splits(corpus, cfg)
    index = json.loads((shards_dir / "index.json").read_text())
    for split, names in splits.items():
        entry = index["splits"][split]
        assert entry["names"] == names and entry["samples"] == len(names) == sum(entry["shards"].values())
        assert all(n == 10 for n in list(entry["shards"].values())[:-1])     # --shard-size 10
        seen = []
        for shard in entry["shards"]:
            for key, data, ext, meta in iter_samples(str(shards_dir / shard)):
                assert data == (corpus.images_dir / meta["name"]).read_bytes()
                assert ext == meta["name"].rsplit(".", 1)[1] == "png"
                assert meta["captions"] == corpus.captions[meta["name"]] and meta["split"] == split
                assert key.startswith(split)
                seen.append(meta["name"])
        assert seen == names
    train_captions = [c for n in splits["train"] for c in corpus.captions[n]]
    vocab = Vocabulary.build(train_captions, cfg.data.min_freq)
    assert index["vocab"] == vocab.to_list() and index["vocab_sha256"] == vocab.fingerprint()
    assert not list(shards_dir.glob(".*.tmp"))


def test_webdataset_itself_decodes_the_shards(shards_dir):
    import webdataset as wds
    samples = list(wds.WebDataset(str(shards_dir / "train-{000000..000003}.tar"), shardshuffle=False)
                   .decode("pil"))
    index = json.loads((shards_dir / "index.json").read_text())
    assert len(samples) == index["splits"]["train"]["samples"]
    assert samples[0]["png"].size == (96, 96) and samples[0]["json"]["captions"]      # Shapes are 96 px


def test_an_interrupted_write_leaves_no_shard_that_looks_complete(shapes_dir, tmp_path, monkeypatch):
    import captioning.data.shards as shards
    cfg, real, calls = tiny_config(shapes_dir, tmp_path / "unused"), shards._add, []

    def add_then_die(tar, name, data):
        calls.append(name)
        if len(calls) == 25:                 # in the middle of the second shard (10 samples, 2 files each)
            raise KeyboardInterrupt
        real(tar, name, data)
    monkeypatch.setattr(shards, "_add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_shards(cfg, tmp_path / "out", shard_size=10, progress=False)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["train-000000.tar"]      # the whole first shard; no second, no index
    assert len(list(iter_samples(str(tmp_path / "out" / "train-000000.tar")))) == 10


# --- the stream ------------------------------------------------------------------------------------

def test_round_robin_over_readers():
    assert taken_per_reader([3, 1, 2], 0) == [0, 0, 0]
    assert taken_per_reader([3, 1, 2], 4) == [2, 1, 1]      # 0 1 2 | 0 . 2
    assert taken_per_reader([3, 1, 2], 5) == [2, 1, 2]
    assert taken_per_reader([3, 1, 2], 6) == [3, 1, 2]
    assert taken_per_reader([0, 5], 3) == [0, 3]
    assert resume_point([3, 1, 2], 4) == ([2, 1, 1], 2)     # 0 1 2 | 0 .: reader 2's turn
    assert resume_point([3, 1, 2], 6) == ([3, 1, 2], 0)


def test_steps_of_several_processes_refuse_none_and_say_what_is_left_out(caplog):
    from captioning.data.stream import ShardSplit, steps_per_epoch

    def split(counts):
        return ShardSplit("train", [f"train-{i:06d}.tar" for i in range(len(counts))], counts, None, 32, 8)

    assert steps_per_epoch(split([8, 8, 8, 8]), batch_size=4, world=2) == 8 and not caplog.records
    assert steps_per_epoch(split([8, 8, 8]), batch_size=4, world=2) == 4      # each: its smallest shard
    assert "8 of the 24 train images are left out of every epoch" in caplog.text
    with pytest.raises(ConfigError, match=r"'data.shards'.*fewer than one batch of 2.*--shard-size"):
        steps_per_epoch(split([8, 8, 1]), batch_size=4, world=2)


def test_the_shards_command_refuses_a_config_that_reads_shards_even_before_they_exist(shapes_dir, tmp_path, capsys):
    (tmp_path / "not_yet").mkdir()
    cfg = stream_config(shapes_dir, tmp_path / "not_yet", tmp_path / "run")
    (tmp_path / "not_yet").rmdir()                      # the shards this config reads: not written yet
    assert main(["shards", "--config", str(_write_config(cfg, tmp_path / "c.yaml")), "--out", str(tmp_path / "o")]) == 2
    assert "already reads shards (webdataset): give the config of the images" in capsys.readouterr().err


def test_every_part_of_an_a_b_shards_pattern_is_made_absolute(tmp_path):
    from captioning.config import absolute_paths

    cfg = tiny_config(tmp_path, tmp_path / "run")
    cfg.data.shards = "a/train-{000000..000001}.tar::b/val-000000.tar"
    out, given = absolute_paths(cfg, tmp_path)
    assert out.data.shards == f"{tmp_path}/a/train-{{000000..000001}}.tar::{tmp_path}/b/val-000000.tar"
    assert given["data.shards"] == cfg.data.shards


def _names(loader) -> list[str]:
    return [n for batch in loader for n in batch.names]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_reads_every_image_once_and_a_resumed_epoch_goes_on_where_it_stopped(
        shapes_dir, shards_dir, tmp_path, workers):
    cfg = stream_config(shapes_dir, shards_dir, tmp_path / "run")
    _, datasets, vocab = prepare_stream(cfg, tmp_path / "run", None)
    train = datasets["train"]
    load = functools.partial(build_stream_loader, train, batch_size=4, shuffle=True, num_workers=workers,
                             seed=0, pad_id=vocab.pad)
    first, again, second = _names(load(epoch=1)), _names(load(epoch=1)), _names(load(epoch=2))
    index = json.loads((shards_dir / "index.json").read_text())
    assert len(train) == 33 and len(load(epoch=1)) == 8        # 8 x 4: a last batch of 1 is left out
    assert len(set(first)) == len(first) == len(set(second)) == 32
    assert set(first) <= set(index["splits"]["train"]["names"])
    assert first == again and first != second
    assert _names(load(epoch=1, skip_batches=3)) == first[12:]
    assert len(load(epoch=1, skip_batches=3)) == 5


def test_a_resume_in_the_middle_of_the_workers_round_goes_on_with_the_next_worker(shapes_dir, shards_dir, tmp_path):
    """Batches of 3 from 2 workers: most positions fall mid-round, and late ones after a worker ran out; a new
    DataLoader starts its round at worker 0, so the stream hands worker 0 the reader whose turn it was."""
    cfg = stream_config(shapes_dir, shards_dir, tmp_path / "run")
    _, datasets, vocab = prepare_stream(cfg, tmp_path / "run", None)
    load = functools.partial(build_stream_loader, datasets["train"], batch_size=3, shuffle=True, num_workers=2,
                             seed=0, epoch=1, pad_id=vocab.pad)
    whole = _names(load())
    assert len(whole) == 33
    for skip in (1, 3, 5, 8, 10):
        assert _names(load(skip_batches=skip)) == whole[3 * skip:], skip


def test_several_processes_read_their_own_shards_and_take_the_same_steps(shapes_dir, shards_dir, tmp_path):
    cfg = stream_config(shapes_dir, shards_dir, tmp_path / "run")
    _, datasets, vocab = prepare_stream(cfg, tmp_path / "run", None)
    per_rank = [build_stream_loader(datasets["train"], batch_size=4, shuffle=True, num_workers=0, seed=0,
                                    epoch=1, pad_id=vocab.pad, rank=r, world=2) for r in range(2)]
    names = [_names(loader) for loader in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) == 6          # the fewest: 2 of the 4 shards, 13 images
    assert all(len(batch.names) == 2 for batch in per_rank[0])
    assert not set(names[0]) & set(names[1])


def test_the_stream_over_http_reads_what_the_folder_holds(shapes_dir, shards_dir, tmp_path):
    local = [s for s in iter_samples(str(shards_dir / "val-000000.tar"))]
    with serving(shards_dir) as base:
        assert list(iter_samples(f"{base}/val-000000.tar")) == local
        found = find_shards(base + "/{train-{000000..000003},val-000000}.tar")
        assert found.index == f"{base}/index.json" and found.counts["train"] == [10, 10, 10, 3]
        cfg = stream_config(shapes_dir, base, tmp_path / "run")
        _, datasets, vocab = prepare_stream(cfg, tmp_path / "run", None)
        over_http = _names(build_stream_loader(datasets["train"], batch_size=4, shuffle=True,
                                               num_workers=0, seed=0, epoch=1, pad_id=vocab.pad))
    cfg = stream_config(shapes_dir, shards_dir, tmp_path / "run2")
    _, datasets, vocab = prepare_stream(cfg, tmp_path / "run2", None)
    assert over_http == _names(build_stream_loader(datasets["train"], batch_size=4, shuffle=True,
                                                   num_workers=0, seed=0, epoch=1, pad_id=vocab.pad))


def test_without_an_index_the_vocabulary_and_counts_come_from_one_pass(shapes_dir, shards_dir, tmp_path):
    folder = tmp_path / "no_index"
    folder.mkdir()
    for shard in shards_dir.glob("*.tar"):
        (folder / shard.name).write_bytes(shard.read_bytes())
    found = find_shards(str(folder) + "/{train-{000000..000003},val-000000}.tar")
    assert found.index is None and found.counts["train"] == [10, 10, 10, 3]
    index = json.loads((shards_dir / "index.json").read_text())
    assert found.vocabulary(1).to_list() == index["vocab"]


# --- training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs, resume_with", [
    (2, []),
    # the epoch under way goes on with the readers it began with, whatever num_workers says now
    (1, ["train.num_workers=2"])])
def test_training_from_shards_killed_mid_epoch_resumes_bit_exact(shapes_dir, shards_dir, tmp_path, monkeypatch,
                                                                 epochs, resume_with):
    """A streamed run stopped right after a mid-epoch save goes on exactly as the unbroken run did."""
    settings = (f"train.epochs={epochs}", "train.batch_size=4", "train.save_every=3")
    fit(stream_config(shapes_dir, shards_dir, tmp_path / "full", *settings), progress=False)

    crash_after_first_mid_epoch_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(stream_config(shapes_dir, shards_dir, tmp_path / "broken", *settings), progress=False)
    monkeypatch.undo()
    saved = read_checkpoint(tmp_path / "broken" / "last.pt")
    assert saved["epoch"] == 0 and saved["batch"] == 3 and saved["stream_readers"] == 1
    fit(None, resume=tmp_path / "broken", overrides=resume_with, progress=False)
    full, resumed = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(tmp_path / "broken" / "last.pt")
    assert resumed["step"] == full["step"] == 8 * epochs
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    assert [h["val_loss"] for h in full["history"]] == [h["val_loss"] for h in resumed["history"]]
    splits = json.loads((tmp_path / "full" / "splits.json").read_text())
    assert len(splits["train"]) == 33 and len(splits["val"]) == 10


def test_the_committed_shards_config_names_the_shards_command_output():
    cfg = load_config("configs/shapes_shards.yaml", check_paths=False)
    base = load_config("configs/shapes.yaml", check_paths=False)
    assert cfg.data.format == "webdataset" and cfg.data.shards == "data/shapes_shards"
    assert cfg.model == base.model


# --- check-data, config, the extra ------------------------------------------------------------------

def test_check_data_reads_shards_and_names_a_count_that_differs_from_the_index(shapes_dir, shards_dir,
                                                                               tmp_path, capsys):
    from captioning.data.check import check_data
    report = check_data(stream_config(shapes_dir, shards_dir, tmp_path / "run"), progress=False)
    assert report["usable_images"] == 48 and report["splits"] == {"train": 33, "val": 10, "test": 5}
    assert report["shard_problems"] == [] and report["unreadable_images"] == []
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in shards_dir.iterdir():
        if SHARD_NAME.match(f.name) or f.name == "index.json":
            (folder / f.name).write_bytes(f.read_bytes())
    index = json.loads((folder / "index.json").read_text())
    index["splits"]["val"]["shards"]["val-000000.tar"] = 11
    (folder / "index.json").write_text(json.dumps(index))
    (folder / "test-000000.tar").write_bytes(b"not a tar file")
    config = _write_config(stream_config(shapes_dir, folder, tmp_path / "run"), tmp_path / "c.yaml")
    assert main(["check-data", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "shard problems      2" in out and "val-000000.tar: 10 sample(s), its index says 11" in out
    assert "test-000000.tar: not a readable tar file" in out
    last = err.strip().splitlines()[-1]          # after the progress bar
    assert last.startswith("error:") and "val-000000.tar: 10 sample(s), its index says 11" in last


def test_config_keys_of_the_stream(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.shards"):
        tiny_config(shapes_dir, tmp_path, "data.format=webdataset")
    with pytest.raises(ConfigError, match="data.shards"):
        tiny_config(shapes_dir, tmp_path, "data.format=webdataset", f"data.shards={tmp_path}/none")
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        tiny_config(shapes_dir, tmp_path, "data.shuffle_buffer=0")
    # the frozen encoder's features come as feature shards (tests/test_shards_training.py)
    assert tiny_config(shapes_dir, tmp_path, "data.format=webdataset", f"data.shards={tmp_path}",
                       "model.train_backbone=false", "train.cache_features=true").train.cache_features
    cfg = tiny_config(shapes_dir, tmp_path, "data.format=webdataset", "data.shards=https://host/{a,b}.tar")
    assert cfg.data.shards == "https://host/{a,b}.tar"


def test_a_missing_webdataset_says_which_extra_to_install(shapes_dir, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "webdataset"
                        else real(name, *a))
    with pytest.raises(EnvironmentProblem, match=r'pip install -e "\.\[scale\]"'):
        find_shards(str(tmp_path))
    config = _write_config(tiny_config(shapes_dir, tmp_path / "r"), tmp_path / "c.yaml")
    assert main(["shards", "--config", str(config), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and '.[scale]' in err
