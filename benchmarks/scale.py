"""Flickr30k's size, stage by stage: each stage's time and the memory it takes, on a stand-in of the real set.

The stand-in is built once under --data (default data/scale, git-ignored) and reused: 31,783 JPEGs of
500x375 (upscaled low-resolution noise plus fine noise: 45-140 KB each, as photos are) and 158,915
caption rows in the Kaggle results.csv layout (`image_name| comment_number| comment`, header, and
one row that lost its second `|`, as the real file has), ~12 words each from a 20,000-word vocabulary
drawn with a Zipf-like law, so that min_freq 5 keeps several thousand words. A marker file written
last says the build is complete; without it the build goes on from the images already there (each is
written to a temporary name, then renamed) and the captions are written again.

Measured, each with the process's RSS (VmRSS) and peak RSS (getrusage) after it:

1. reading and repairing the captions (data.read_captions, format auto), the split (data.make_splits)
   and the vocabulary (Vocabulary.build, min_freq 5, train split) in a process that has imported
   torch: read_s, and corpus_rss_mb, the growth of RSS across the three;
2. check-data over every image (check.check_data): seconds and images/s;
3. the DataLoader (CaptionDataset + build_loader over the train split, 224 px, batch 32) with 0 and
   2 workers, over --loader-images images: images/s;
4. the feature cache: writing it (extract_features) with resnet18 over --cache-images images, its
   rate projected to the whole set; ResNet-152's (the reference, frozen, folded as extraction runs
   it) images/s over a few batches, projected likewise; then a cache of the reference's size
   (7x7x2048 fp16 for every image, ~6.4 GB of real bytes, written by extraction's own writer and kept
   under --data for the next run) read back in random order through FeatureDataset: warm (said
   whether the file sat in the page cache, from fincore) and cold (the file's pages dropped with
   posix_fadvise DONTNEED, which needs no root, over --cold-images images);
5. training on cached features at the reference size (d_model 512, 6+6 layers, 7,736 words, batch 32
   images x 5 captions, precision auto): train_one_epoch over a few steps, the epoch projected;
6. scoring 1,000 test images with every metric (metrics.score_captions), predictions being another
   image's caption.

Last line: scale: rows=N read_s=... corpus_rss_mb=... loader_img_s=... cache_read_img_s=...
projected_epoch_min=... score_s=...   (loader_img_s with 2 workers; cache_read_img_s warm)

--shards, instead of stages 2-6 (scale_shards.py): training from WebDataset shards against training
from the folder, images/s over --shards-steps steps of 32 images, in turns, with the same 2 loader
workers and model. Last line: scale_shards: images=N steps=... folder_img_s=... shards_img_s=...
shards_vs_folder=... (goal >= 0.9).

    python benchmarks/scale.py [--data data/scale] [--images 31783] [--loader-images 3000]
        [--cache-images 2000] [--train-steps 4] [--delete-cache] [--json PATH]
    python benchmarks/scale.py --shards [--shard-size 1000] [--shards-steps 30] [--rounds 3]
        [--shards-image-size 224] [--device cpu|cuda]
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import common
import scale_shards
from captioning.config import from_dict
from captioning.data.check import check_data
from captioning.data.corpus import Corpus, make_splits
from captioning.data.dataset import CaptionDataset, build_loader
from captioning.data.readers import read_captions
from captioning.data.vocab import Vocabulary
from captioning.device import resolve_precision
from captioning.eval.metrics import score_captions
from captioning.model.caption_model import build_model
from captioning.train.feature_cache import FEATURES_FILE, FeatureCache, FeatureDataset, _read_done, build_encoder
from captioning.train.features import _CacheWriter, _extraction_net, _Images, extract_features
from captioning.train.loop import TrainState, build_optimizer, build_scheduler, train_one_epoch

FLICKR30K_IMAGES, CAPTIONS, WORDS = 31_783, 5, 20_000
REFERENCE_VOCAB, GRID, CHANNELS = 7736, 49, 2048
MARKER = "COMPLETE.json"


# ---------------------------------------------------------------- the stand-in

def image_name(i: int) -> str:
    return f"{1000000000 + 7919 * i}.jpg"


def make_images(args: tuple[Path, list[int]]) -> int:
    """The images with these indices not already in `folder`; each a function of its index alone."""
    folder, indices = args
    made = 0
    for i in indices:
        path = folder / image_name(i)
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        height, fine = int(rng.integers(24, 160)), int(rng.integers(4, 13))    # detail and grain: 45-140 KB
        coarse = rng.integers(0, 256, (height, height * 4 // 3, 3), dtype=np.uint8)
        coarse = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-fine, fine + 1, (375, 500, 3), dtype=np.int16)
        tmp = path.with_suffix(".tmp")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)
        made += 1
    return made


def make_captions(path: Path, n_images: int) -> int:
    """results.csv in the Kaggle layout; one row with its second '|' missing. Returns the rows written."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(int(WORDS * 1.05))})[:WORDS]
    words = [words[k] for k in rng.permutation(len(words))]           # rank no longer follows the alphabet
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.3
    lengths = rng.integers(8, 17, n_images * CAPTIONS)
    ids = iter(rng.choice(len(words), int(lengths.sum()), p=p / p.sum()).tolist())
    lines = ["image_name| comment_number| comment"]
    for row, n in enumerate(lengths):
        text = "A " + " ".join(words[next(ids)] for _ in range(n)) + " ."
        name, k = image_name(row // CAPTIONS), row % CAPTIONS
        lines.append(f"{name}| {k}   {text}" if row == len(lengths) // 8 else f"{name}| {k}| {text}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return len(lines) - 1


def build_standin(folder: Path, n_images: int) -> tuple[float, str]:
    """(seconds, what was done): the stand-in under `folder`, built, finished, or found complete."""
    marker, images = folder / MARKER, folder / "images"
    wanted = {"images": n_images, "rows": n_images * CAPTIONS}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return 0.0, "reused"
    start = time.perf_counter()
    marker.unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    chunks = [(images, list(range(k, min(k + 500, n_images)))) for k in range(0, n_images, 500)]
    with multiprocessing.get_context("fork").Pool(2) as pool:       # the captions in a worker too: see stage 1
        rows = pool.apply_async(make_captions, (folder / "results.csv", n_images))
        made = sum(pool.imap_unordered(make_images, chunks))
        assert rows.get() == wanted["rows"]
    marker.write_text(json.dumps(wanted))
    return time.perf_counter() - start, f"built ({made} new images)"


# ---------------------------------------------------------------- measuring

def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(stage: str, seconds: float, extra: str = "") -> None:
    print(f"{stage:<34} {seconds:8.1f} s   rss {rss_mb():7.0f} MB  peak {common.peak_rss_mb():7.0f} MB  {extra}",
          flush=True)


def stage_read(cfg, n_images: int):
    before = rss_mb()
    start = time.perf_counter()
    found = read_captions(cfg.data.captions, "auto")
    corpus = Corpus(Path(cfg.data.images), found.captions, found.splits)
    splits = make_splits(corpus, cfg)
    vocab = Vocabulary.build((c for n in splits["train"] for c in corpus.captions[n]), min_freq=cfg.data.min_freq)
    seconds, grown = time.perf_counter() - start, rss_mb() - before
    captions = sum(len(c) for c in found.captions.values())
    report("1. read + split + vocabulary", seconds,
           f"rows {found.rows}, {len(found.skipped)} skipped, {captions} captions of {len(found.captions)} images; "
           f"split {'/'.join(str(len(v)) for v in splits.values())}; vocabulary {len(vocab)} (min_freq "
           f"{cfg.data.min_freq}); RSS grew {grown:.0f} MB")
    assert len(found.captions) == n_images
    return found, corpus, splits, vocab, seconds, grown


def stage_check(cfg) -> None:
    start = time.perf_counter()
    result = check_data(cfg, progress=False)
    seconds = time.perf_counter() - start
    report("2. check-data", seconds, f"{result['images']} images, {result['images'] / seconds:.0f} images/s, "
                                     f"{result['usable_images']} usable, {len(result['skipped_rows'])} row(s) skipped")


def loader_rate(dataset, n: int, workers: int) -> float:
    subset = Subset(dataset, range(min(n, len(dataset))))
    start = time.perf_counter()
    seen = sum(len(b.names) for b in build_loader(subset, batch_size=32, shuffle=True, num_workers=workers))
    seconds = time.perf_counter() - start
    report(f"3. loader, {workers} workers", seconds, f"{seen} images, {seen / seconds:.1f} images/s")
    return seen / seconds


def stage_cache_write(cfg, names: list[str], folder: Path) -> None:
    """resnet18 through extract_features over `names`; ResNet-152 on a few batches; both projected."""
    small = from_dict({**cfg_raw(cfg), "model": {"backbone": "resnet18", "pretrained": False}}, check_paths=False)
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    extract_features(small, names, small.data.images, folder, batch_size=32, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    rate = len(names) / seconds
    report("4a. cache write, resnet18", seconds, f"{len(names)} images, {rate:.1f} images/s; all "
                                                 f"{FLICKR30K_IMAGES}: {FLICKR30K_IMAGES / rate / 60:.1f} min")
    reference = from_dict({**cfg_raw(cfg), "model": {"pretrained": False}}, check_paths=False)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    net, dtype, _ = _extraction_net(build_encoder(reference), device, precision)
    batches = DataLoader(_Images(Path(cfg.data.images), names[:64], 224), batch_size=16)
    batches = [b.to(dtype, memory_format=torch.channels_last) for b in batches]
    with torch.no_grad():
        net(batches[0])                                                         # warm-up
        start = time.perf_counter()
        for b in batches[1:]:
            net(b)
    seconds = time.perf_counter() - start
    rate = 16 * (len(batches) - 1) / seconds
    report("4b. ResNet-152 forward, " + precision, seconds,
           f"{16 * (len(batches) - 1)} images, {rate:.2f} images/s; all {FLICKR30K_IMAGES}: "
           f"{FLICKR30K_IMAGES / rate / 3600:.1f} h")


def cfg_raw(cfg) -> dict:
    return {"data": {"format": "auto", "images": cfg.data.images, "captions": cfg.data.captions},
            "train": {"num_workers": 2, "device": "cpu", "cache_features": True}}


def reference_cache(folder: Path, names: list[str]) -> tuple[FeatureCache, str]:
    """A complete cache of the reference's size for `names`, written by extraction's writer, or the one
    already there. The bytes are noise (reading does not look at them), but real bytes: no sparse file."""
    shape = (len(names), GRID, CHANNELS)
    try:
        cache = FeatureCache.open(folder)
        if cache.complete and cache.shape == shape and cache.names == names \
                and (folder / FEATURES_FILE).stat().st_size == math.prod(shape) * 2:
            return cache, "reused"
    except (FileNotFoundError, ValueError, KeyError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    writer = _CacheWriter(folder, names, None, meta=lambda shape: {"key": "scale", "shape": list(shape),
                                                                   "dtype": "float16", "names": names})
    chunk = np.random.default_rng(0).standard_normal((256, GRID, CHANNELS), dtype=np.float32).astype(np.float16)
    start = time.perf_counter()
    for k in range(0, len(names), len(chunk)):
        writer.append(chunk[:len(names) - k])
    writer.close()
    assert _read_done(folder) == len(names)
    return FeatureCache.open(folder), f"written in {time.perf_counter() - start:.0f} s"


def in_page_cache(path: Path) -> str:
    """The share of the file's bytes in the page cache, as fincore tells it (util-linux)."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
                             capture_output=True, text=True, check=True).stdout.split()
        return f"{100 * int(out[0]) / int(out[1]):.0f}% in the page cache"
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return "page cache share unknown (no fincore)"


def read_rate(cache: FeatureCache, dataset: CaptionDataset, n: int) -> float:
    features = FeatureDataset(cache, dataset)
    order = np.random.default_rng(1).permutation(len(features))[:n].tolist()
    start = time.perf_counter()
    for i in order:
        features[i]
    return len(order) / (time.perf_counter() - start)


def stage_cache_read(folder: Path, dataset: CaptionDataset, cold_images: int) -> float:
    cache, how = reference_cache(folder, list(dataset.names))
    path = folder / FEATURES_FILE
    size_gb = path.stat().st_size / 1e9
    state = in_page_cache(path)
    start = time.perf_counter()
    warm = read_rate(cache, dataset, len(dataset))
    report("4c. cache read, random order", time.perf_counter() - start,
           f"{len(dataset)} images of {GRID}x{CHANNELS} fp16 ({size_gb:.1f} GB, {how}; before reading "
           f"{state}, after {in_page_cache(path)}): {warm:.0f} images/s")
    del cache                                  # its map holds the pages: DONTNEED drops unmapped pages only
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    state = in_page_cache(path)
    start = time.perf_counter()
    cold = read_rate(FeatureCache.open(folder), dataset, cold_images)
    report("4d. cache read, cold", time.perf_counter() - start,
           f"{min(cold_images, len(dataset))} images after posix_fadvise DONTNEED ({state}; drop_caches "
           f"needs root): {cold:.0f} images/s")
    return warm


def stage_train(cfg, cache_folder: Path, dataset: CaptionDataset, steps: int) -> float:
    """Seconds per step of train_one_epoch on cached features at the reference size; returns epoch minutes."""
    device = torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, device)
    features = FeatureDataset(FeatureCache.open(cache_folder), dataset)
    torch.manual_seed(0)
    model = build_model(cfg.model, REFERENCE_VOCAB, 0)
    optimizer = build_optimizer(cfg, model)
    per_epoch = len(build_loader(features, batch_size=32, shuffle=True, num_workers=0))
    loader = build_loader(Subset(features, range(32 * (steps + 1))), batch_size=32, shuffle=True, num_workers=0)
    times = [time.perf_counter()]
    train_one_epoch(model, loader, optimizer, build_scheduler(cfg, optimizer, per_epoch),
                    torch.amp.GradScaler("cpu", enabled=precision == "fp16"), TrainState(), precision=precision,
                    device=device, progress=False, on_step=lambda: times.append(time.perf_counter()))
    step_s = float(np.median(np.diff(times[2:])))              # the first step warms up
    minutes = step_s * per_epoch / 60
    report(f"5. training steps, {precision}", times[-1] - times[0],
           f"{steps} steps after 1 warm-up, {step_s:.2f} s a step of 32 images x {CAPTIONS} captions; "
           f"epoch of {per_epoch} steps: {minutes:.0f} min projected ({torch.get_num_threads()} threads)")
    return minutes


def stage_score(dataset: CaptionDataset, n: int) -> float:
    names = list(dataset.names)[:n]
    references = {name: dataset.references[i] for i, name in enumerate(names)}
    predictions = {name: dataset.references[(i + 1) % len(names)][0] for i, name in enumerate(names)}
    start = time.perf_counter()
    scores, notes = score_captions(predictions, references)
    seconds = time.perf_counter() - start
    report("6. score", seconds, f"{len(names)} images: " + ", ".join(
        f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in scores.items()) + "".join(f"; {n}" for n in notes))
    return seconds


def reference_vocab(vocab: Vocabulary) -> Vocabulary:
    """The stand-in's vocabulary cut or filled to the reference's 7,736 tokens."""
    tokens = vocab.tokens[:REFERENCE_VOCAB]
    return Vocabulary(tokens + [f"<filler{k}>" for k in range(REFERENCE_VOCAB - len(tokens))])


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--data", default="data/scale", help="where the stand-in is built and kept")
    parser.add_argument("--images", type=int, default=FLICKR30K_IMAGES, help="a smaller stand-in, for a trial")
    parser.add_argument("--loader-images", type=int, default=3000)
    parser.add_argument("--cache-images", type=int, default=2000)
    parser.add_argument("--cold-images", type=int, default=5000)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--score-images", type=int, default=1000)
    parser.add_argument("--delete-cache", action="store_true", help="remove the 6.4 GB feature file at the end")
    parser.add_argument("--shards", action="store_true", help="training from shards against from the folder only")
    parser.add_argument("--shard-size", type=int, default=1000, help="--shards: images a shard")
    parser.add_argument("--shards-steps", type=int, default=30, help="--shards: training steps a round")
    parser.add_argument("--rounds", type=int, default=3, help="--shards: rounds of each, in turns")
    parser.add_argument("--shards-image-size", type=int, default=224, help="--shards: data.image_size (px)")
    parser.add_argument("--device", default="cpu", help="--shards: where the model trains (cpu, cuda)")
    args = parser.parse_args()
    folder = Path(args.data).expanduser().resolve()
    build_s, how = build_standin(folder, args.images)
    sizes = [p.stat().st_size for p in list((folder / "images").iterdir())[:500]]
    print(f"stand-in {folder}: {how} in {build_s:.0f} s; {args.images} images, {np.mean(sizes) / 1e3:.0f} KB mean "
          f"({min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB)", flush=True)
    cfg = from_dict({"data": {"format": "auto", "images": str(folder / "images"),
                              "captions": str(folder / "results.csv")},
                     "model": {"pretrained": False}, "train": {"num_workers": 2, "device": "cpu"}},
                    check_paths=False)
    device, precision = torch.device("cpu"), resolve_precision(cfg.train.precision, torch.device("cpu"))
    env = common.machine(device, precision)
    print(f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    found, corpus, splits, vocab, read_s, corpus_mb = stage_read(cfg, args.images)
    if args.shards:
        figures = scale_shards.stage_shards(cfg, folder, corpus, splits, vocab, args, report)
        common.finish("scale_shards", figures, env, args.json)
        return
    stage_check(cfg)
    vocab = reference_vocab(vocab)
    train = CaptionDataset(corpus, splits["train"], vocab, cfg.data.image_size, cfg.data.max_words)
    every = CaptionDataset(corpus, sorted(corpus.captions), vocab, cfg.data.image_size, cfg.data.max_words)
    rates = {w: loader_rate(train, args.loader_images, w) for w in (0, 2)}
    print(f"loader: {rates[0]:.1f} images/s with 0 workers, {rates[2]:.1f} with 2")
    stage_cache_write(cfg, list(train.names)[:args.cache_images], folder / "features_small")
    cache_folder = folder / "features_reference"
    cache_read = stage_cache_read(cache_folder, every, args.cold_images)
    epoch_min = stage_train(cfg, cache_folder, train, args.train_steps)
    test = CaptionDataset(corpus, splits["test"], vocab, cfg.data.image_size, cfg.data.max_words)
    score_s = stage_score(test, args.score_images)
    if args.delete_cache:
        shutil.rmtree(cache_folder)
    common.finish("scale", {"rows": found.rows, "read_s": f"{read_s:.2f}", "corpus_rss_mb": f"{corpus_mb:.0f}",
                            "loader_img_s": f"{rates[2]:.1f}", "cache_read_img_s": f"{cache_read:.0f}",
                            "projected_epoch_min": f"{epoch_min:.0f}", "score_s": f"{score_s:.1f}"}, env, args.json)


if __name__ == "__main__":
    main()
