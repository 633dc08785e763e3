"""The frozen-encoder feature cache: fp16 copies of the encoder's output, keyed, resumable, and training on them
matches training on the images."""
import copy
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioning.data.corpus import read_corpus
from captioning.data.dataset import CaptionDataset, build_loader, build_transform, collate
from captioning.data.images import open_image
from captioning.data.vocab import Vocabulary
from captioning.model.backbone import Encoder
from captioning.model.caption_model import build_model
from captioning.train.feature_cache import FeatureCache, FeatureDataset, build_encoder, cache_key
from captioning.train.features import extract_features
from conftest import tiny_config

# stride 8 at 32 px: a 4x4 grid of resnet18's 128 layer2 channels
FROZEN = ("model.train_backbone=false", "model.backbone_stages=2", "model.dropout=0")
FP32 = {"precision": "fp32", "progress": False}


def setup(shapes_dir, tmp_path, *overrides):
    cfg = tiny_config(shapes_dir, tmp_path / "run", *FROZEN, *overrides)
    corpus = read_corpus(cfg)
    return cfg, corpus, sorted(corpus.captions)


def caption_dataset(cfg, corpus, names):
    vocab = Vocabulary.build((c for n in corpus.captions for c in corpus.captions[n]), cfg.data.min_freq)
    return CaptionDataset(corpus, names, vocab, cfg.data.image_size, cfg.data.max_words), vocab


class Counting(nn.Module):
    """An encoder that counts its forward calls, and raises after `fail_after` of them (a killed process)."""

    def __init__(self, encoder: nn.Module, fail_after: int | None = None):
        super().__init__()
        self.encoder, self.fail_after, self.calls = encoder, fail_after, 0

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        return self.encoder(x)


def test_cached_features_are_the_training_encoders_output_in_fp16(shapes_dir, tmp_path):
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    cache = extract_features(cfg, names, corpus.images_dir, tmp_path / "features", batch_size=16, **FP32)
    # the encoder of the model as fit builds it (seed, then the model): random weights, so the seed must carry over
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab_size=10)
    transform = build_transform(cfg.data.image_size)
    with torch.no_grad():
        expected = model.encoder(torch.stack([transform(open_image(corpus.images_dir / n)) for n in names]))
    N, L, C = len(names), 16, 128
    assert expected.shape == (N, L, C)
    assert cache.complete and len(cache) == N and cache.names == names and cache.shape == (N, L, C)
    got = torch.stack([cache[i] for i in range(N)])
    assert got.dtype == torch.float16
    assert not torch.equal(got[0], got[1])
    torch.testing.assert_close(got.float(), expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(cache.get(names[7]), got[7])
    # on disk: raw float16 rows in name order, and a readable meta.json
    path = cache.folder / "features.f16"
    assert path.stat().st_size == N * L * C * 2
    assert torch.equal(torch.from_numpy(np.fromfile(path, dtype=np.float16).reshape(N, L, C)), got)
    meta = json.loads((cache.folder / "meta.json").read_text())
    assert meta["key"] == cache.folder.name == cache_key(cfg, names)
    assert meta["names"] == names and meta["shape"] == [N, L, C] and meta["dtype"] == "float16"
    assert meta["key_parts"]["image_size"] == 32 and meta["key_parts"]["seed"] == 0
    assert FeatureCache.open(cache.folder).get(names[7]).equal(got[7])

    # reduced precision (the default on GPUs and AMX CPUs) casts the encoder: close, not equal
    bf16 = extract_features(cfg, names, corpus.images_dir, tmp_path / "bf16", precision="bf16", progress=False)
    assert bf16.meta["precision"] == "bf16"
    features = torch.stack([bf16[i] for i in range(N)]).float()
    assert not torch.equal(features, got.float())
    torch.testing.assert_close(features, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_the_key_follows_everything_that_changes_the_features(shapes_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "flickr30k_images", images)   # this test rewrites a file
    cfg = tiny_config(shapes_dir, tmp_path / "run", *FROZEN, f"data.images={images}")
    names = sorted(os.listdir(images))
    key = cache_key(cfg, names)
    assert cache_key(copy.deepcopy(cfg), list(names)) == key

    def key_with(*overrides):
        return cache_key(tiny_config(shapes_dir, tmp_path / "run", *FROZEN, f"data.images={images}", *overrides), names)
    changed = [key_with("data.image_size=64"), key_with("model.backbone_stages=3"), key_with("model.backbone=resnet34"),
               key_with("seed=1"), cache_key(cfg, names[:-1]), cache_key(cfg, names[::-1])]
    assert len({key, *changed}) == len(changed) + 1
    # ImageNet weights do not depend on the seed, random ones do
    assert key_with("model.pretrained=true") == key_with("model.pretrained=true", "seed=1") != key
    assert key_with("model.dropout=0.3", "train.lr=0.1") == key

    root = tmp_path / "features"
    first = extract_features(cfg, names, images, root, batch_size=16, **FP32)
    assert first.folder == root / key
    counting = Counting(build_encoder(cfg))
    assert extract_features(cfg, names, images, root, encoder=counting, batch_size=16, **FP32).folder == first.folder
    assert counting.calls == 0

    # an encoder with other weights than the cache's is refused, not silently mixed
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        other = Encoder(cfg.model.backbone, pretrained=False, stages=cfg.model.backbone_stages)
    with pytest.raises(ValueError, match="other encoder weights"):
        extract_features(cfg, names, images, root, encoder=other, batch_size=16, **FP32)

    # an image rewritten in place: a new folder with the new picture's features; the old one stays whole
    target = images / names[3]
    before = target.stat()
    target.write_bytes((images / names[4]).read_bytes())
    assert (target.stat().st_size, target.stat().st_mtime_ns) != (before.st_size, before.st_mtime_ns)
    new = extract_features(cfg, names, images, root, encoder=counting, batch_size=16, **FP32)
    assert new.folder != first.folder and counting.calls == 3
    assert sorted(p.name for p in root.iterdir()) == sorted([first.folder.name, new.folder.name])
    assert torch.equal(new.get(names[3]), new.get(names[4]))
    assert not torch.equal(first.get(names[3]), new.get(names[3]))
    assert FeatureCache.open(first.folder).complete


def test_an_interrupted_extraction_resumes_from_its_count_and_ends_as_an_unbroken_one(shapes_dir, tmp_path):
    cfg, corpus, names = setup(shapes_dir, tmp_path)   # 48 images: 6 batches of 8
    with pytest.raises(RuntimeError, match="killed"):
        extract_features(cfg, names, corpus.images_dir, tmp_path / "a", encoder=Counting(build_encoder(cfg), 2),
                         batch_size=8, **FP32)
    partial = FeatureCache.open(tmp_path / "a" / cache_key(cfg, names))
    assert partial.done == 16 and not partial.complete
    with pytest.raises(IndexError, match="not extracted yet"):
        partial[16]
    with pytest.raises(ValueError, match="incomplete"):
        FeatureDataset(partial, caption_dataset(cfg, corpus, names)[0])

    counting = Counting(build_encoder(cfg))
    resumed = extract_features(cfg, names, corpus.images_dir, tmp_path / "a", encoder=counting, batch_size=8, **FP32)
    assert counting.calls == 4 and resumed.complete and resumed.folder == partial.folder
    # the same module uninterrupted (the encoder built in extract_features runs folded: equal to ~1e-6, not bitwise)
    unbroken = extract_features(cfg, names, corpus.images_dir, tmp_path / "b", encoder=Counting(build_encoder(cfg)),
                                batch_size=8, **FP32)
    assert (resumed.folder / "features.f16").read_bytes() == (unbroken.folder / "features.f16").read_bytes()


def test_training_on_cached_features_matches_training_on_images(shapes_dir, tmp_path):
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    dataset, vocab = caption_dataset(cfg, corpus, names)
    cache = extract_features(cfg, names, corpus.images_dir, tmp_path / "features", batch_size=16, **FP32)
    torch.manual_seed(cfg.seed)       # as fit does: the cache's encoder is this model's encoder
    on_images = build_model(cfg.model, len(vocab), vocab.pad)
    on_features = copy.deepcopy(on_images)
    initial = {k: v.clone() for k, v in on_images.state_dict().items()}

    def train(model, dataset, cached: bool) -> list[float]:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        model.train()
        losses = []
        loader = build_loader(dataset, batch_size=8, shuffle=False, num_workers=0, pad_id=vocab.pad)
        for batch, _ in zip(loader, range(3)):
            inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
            if cached:
                logits = model(inputs, batch.image_index, features=batch.features.float())
            else:
                logits = model(inputs, batch.image_index, images=batch.images)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=vocab.pad)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    expected = train(on_images, dataset, cached=False)
    # fp16 features move the losses by ~1e-6; features of the wrong images (rows off by one) move them by 1e-3
    assert train(on_features, FeatureDataset(cache, dataset), cached=True) == pytest.approx(expected, rel=1e-4)
    # Adam turns the few near-zero gradients that fp16 noise flips into steps of lr the other way, so compare
    # the whole update: 2% apart here, 23% for features of the wrong images
    a, b = on_images.state_dict(), on_features.state_dict()
    update = sum(((a[k] - initial[k]) ** 2).sum() for k in a).sqrt()
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    assert max((a[k] - initial[k]).abs().max() for k in a) > 1e-3 and apart < 0.05 * update, (apart, update)

def test_a_feature_batch_collates_like_an_image_batch(shapes_dir, tmp_path):
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    cache = extract_features(cfg, names[:30], corpus.images_dir, tmp_path / "features", batch_size=16, **FP32)
    dataset, vocab = caption_dataset(cfg, corpus, names[10:20])   # a split: rows are found by name
    features = FeatureDataset(cache, dataset)
    assert len(features) == 10
    batch = collate([features[i] for i in range(4)], vocab.pad)
    reference = collate([dataset[i] for i in range(4)], vocab.pad)
    assert batch.images is None and reference.features is None      # one field, one meaning
    assert batch.features.shape == (4, 16, 128) and batch.features.dtype == torch.float16
    assert torch.equal(batch.features[2], cache.get(names[12]))
    assert torch.equal(batch.tokens, reference.tokens) and torch.equal(batch.image_index, reference.image_index)
    assert batch.names == reference.names == names[10:14]
    with pytest.raises(KeyError, match="not in the feature cache"):
        FeatureDataset(cache, caption_dataset(cfg, corpus, names[25:35])[0])


needs_ort = pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
                               reason="onnx/onnxruntime not installed: pip install -e '.[export]'")


@needs_ort
def test_onnx_runtime_extracts_the_features_pytorch_does(shapes_dir, tmp_path):
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    names = names[:24]
    ort = extract_features(cfg, names, corpus.images_dir, tmp_path / "ort", batch_size=16, engine="onnxruntime",
                           **FP32)
    ours = extract_features(cfg, names, corpus.images_dir, tmp_path / "torch", batch_size=16, engine="torch", **FP32)
    assert ort.meta["engine"] == {"engine": "onnxruntime", "precision": "fp32"}
    assert ours.meta["engine"]["engine"] == "torch" and ort.key == ours.key
    np.testing.assert_allclose(np.asarray(ort.data, np.float32), np.asarray(ours.data, np.float32), rtol=2e-3,
                               atol=2e-3 * float(np.abs(ours.data).max()))


def slowed(monkeypatch, engine: str, seconds: float = 0.05) -> list:
    """Make one engine of features.Extractor `seconds` slower an image; returns the batch sizes each call got."""
    from captioning.train import features
    owner, name = (features.Extractor, "_torch") if engine == "torch" else (features._OrtEncoder, "__call__")
    original, calls = getattr(owner, name), []

    def run(self, images):
        calls.append(len(images))
        time.sleep(seconds * len(images))
        return original(self, images)
    monkeypatch.setattr(owner, name, run)
    return calls


@needs_ort
@pytest.mark.parametrize("slow", ["torch", "onnxruntime"])
def test_auto_times_both_engines_on_the_first_batch_and_keeps_the_faster(shapes_dir, tmp_path, monkeypatch, caplog,
                                                                        slow):
    from captioning.train import features
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    names = names[:40]
    few = extract_features(cfg, names, corpus.images_dir, tmp_path / "few", batch_size=16, **FP32)
    assert few.meta["engine"]["engine"] == "torch" and "fewer than the 512" in few.meta["engine"]["why"]
    monkeypatch.setattr(features, "PROBE_MIN_IMAGES", 40)
    calls = slowed(monkeypatch, slow)
    with caplog.at_level("INFO", logger="captioning.train.features"):
        auto = extract_features(cfg, names, corpus.images_dir, tmp_path / "auto", batch_size=16, **FP32)
    faster = {"torch": "onnxruntime", "onnxruntime": "torch"}[slow]
    choice = auto.meta["engine"]
    assert choice["engine"] == faster and choice["precision"] == "fp32"
    assert choice["probe"]["images"] == 16 and choice["probe"]["torch_precision"] == "fp32"
    assert f"{faster} extracts" in caplog.text
    # the slow one: (ONNX Runtime: the export's check,) a warm-up on 2 images, its two quarters of 16, no more
    assert calls == ([2, 4, 4] if slow == "torch" else [2, 2, 4, 4])
    np.testing.assert_allclose(np.asarray(auto.data, np.float32), np.asarray(few.data, np.float32), rtol=2e-3,
                               atol=2e-3 * float(np.abs(few.data).max()))


@needs_ort
def test_a_first_batch_too_small_to_time_and_a_resumed_cache_keep_one_engine(shapes_dir, tmp_path, monkeypatch):
    from captioning.train import features
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    names = names[:20]
    monkeypatch.setattr(features, "PROBE_MIN_IMAGES", 1)
    small = extract_features(cfg, names, corpus.images_dir, tmp_path / "small", batch_size=4, **FP32)
    assert small.meta["engine"]["engine"] == "torch" and "too small to time" in small.meta["engine"]["why"]

    # a cache begun by ONNX Runtime and killed goes on in ONNX Runtime under auto, without timing again
    run, images_seen = features._OrtEncoder.__call__, []

    def killed_after_16(self, images):
        images_seen.append(len(images))
        if sum(images_seen) > 2 + 16:                   # the export's check, then two batches of 8
            raise KeyboardInterrupt
        return run(self, images)
    monkeypatch.setattr(features._OrtEncoder, "__call__", killed_after_16)
    with pytest.raises(KeyboardInterrupt):
        extract_features(cfg, names, corpus.images_dir, tmp_path / "resumed", batch_size=8, engine="onnxruntime",
                         **FP32)
    monkeypatch.setattr(features._OrtEncoder, "__call__", run)
    calls = slowed(monkeypatch, "onnxruntime", 0.0)
    resumed = extract_features(cfg, names, corpus.images_dir, tmp_path / "resumed", batch_size=8, **FP32)
    assert resumed.complete and calls == [2, 4]           # the export's check and the last 4 images: no probe


@needs_ort
def test_a_wrong_export_is_refused_and_auto_goes_on_in_pytorch(shapes_dir, tmp_path, monkeypatch, caplog):
    from captioning.train import features
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    names = names[:20]
    monkeypatch.setattr(features, "PROBE_MIN_IMAGES", 1)
    real_load = __import__("captioning.decode.onnx_engine", fromlist=["load_session"]).load_session

    class Off:                                   # an exporter or runtime that gets the numbers wrong
        def __init__(self, path, threads=None):
            self.session = real_load(path, threads)

        def run(self, outputs, feeds):
            return [2 * a for a in self.session.run(outputs, feeds)]

    monkeypatch.setattr("captioning.decode.onnx_engine.load_session", Off)
    with pytest.raises(RuntimeError, match="exported to ONNX gives features 1 of the largest away"):
        extract_features(cfg, names, corpus.images_dir, tmp_path / "ort", engine="onnxruntime", **FP32)
    with caplog.at_level("WARNING", logger="captioning.train.features"):
        auto = extract_features(cfg, names, corpus.images_dir, tmp_path / "auto", **FP32)
    assert auto.meta["engine"]["engine"] == "torch" and "exported to ONNX" in auto.meta["engine"]["why"]
    assert "PyTorch extracts" in caplog.text

    class InvalidGraph(Exception):                  # what onnxruntime raises is not always a RuntimeError
        pass

    def fails(path, threads=None):
        raise InvalidGraph("[ONNXRuntimeError] : 10 : INVALID_GRAPH")
    monkeypatch.setattr("captioning.decode.onnx_engine.load_session", fails)
    auto = extract_features(cfg, names, corpus.images_dir, tmp_path / "auto2", **FP32)
    assert auto.meta["engine"]["engine"] == "torch" and "INVALID_GRAPH" in auto.meta["engine"]["why"]


def test_engine_onnxruntime_says_why_it_cannot_run(shapes_dir, tmp_path):
    cfg, corpus, names = setup(shapes_dir, tmp_path)
    with pytest.raises(ValueError, match="engine='tensorrt': expected one of auto, torch, onnxruntime"):
        extract_features(cfg, names, corpus.images_dir, tmp_path / "f", engine="tensorrt", **FP32)
    with pytest.raises(ValueError, match="only the ResNet Encoder is exported, not a Counting"):
        extract_features(cfg, names, corpus.images_dir, tmp_path / "f", encoder=Counting(build_encoder(cfg)),
                         engine="onnxruntime", **FP32)
