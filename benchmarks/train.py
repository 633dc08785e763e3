"""Training speed: the reference design's pipeline against ours, one epoch each, side by side in one run.

The reference-size model (ResNet-152 frozen at 224 px, d_model 512, 6+6 layers, 7,736 words, random
weights -- speed does not depend on them) over a generated set of JPEGs (375x500, 5 captions of 12
random words each). Measured:

- reference: what the reference design did: one row per caption, so every step opens, decodes and
  runs ResNet-152 on each of its 32 rows (5 times per image an epoch), fp32;
- ours: the feature cache built in this same run (its time counted), then an epoch of
  `train_one_epoch` on cached features at the default precision, the image side once per image
  for all of its captions, with about as many caption rows per step (6 images = 30 rows).

With --repeats N both run N times, alternated, and the figures are medians (this machine's timings
move by about 10% from run to run). The cache says which engine ran the ResNet (`engine="auto"`,
as training builds it).

Then, on a CPU with the [export] extra, the extraction engines side by side on --extract-images
generated images (0: skipped), at each precision of --extract-precisions (default: auto's, and fp32,
the precision of CPUs without bf16 units): PyTorch alone, ONNX Runtime alone, and "auto", which times
both on its first batch and keeps the faster. Last line:
train: speedup_vs_reference=X reference_s=... ours_s=... cache_s=... epoch_s=... cache_engine=E
       [extract_<precision>_engine=E extract_<precision>_auto_vs_torch=R ...]

    python benchmarks/train.py [--images 32] [--repeats 1] [--device cpu|cuda] [--extract-images 256] [--json PATH]
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from captioning.config import from_dict
from captioning.data.corpus import Corpus
from captioning.data.dataset import Batch, CaptionDataset, build_loader, collate
from captioning.data.vocab import SPECIALS, Vocabulary
from captioning.device import resolve_precision
from captioning.model.caption_model import build_model
from captioning.train.feature_cache import FeatureDataset
from captioning.train.features import PROBE_MIN_IMAGES, extract_features
from captioning.train.loop import TrainState, build_scheduler, caption_loss, train_one_epoch

WORDS, CAPTIONS = 12, 5
IMAGES, VOCAB, STEP_IMAGES = 32, 7736, 6   # defaults: images in the set, words, images a step of ours


def make_data(folder: Path, n: int, vocab_words: list[str], rng) -> Corpus:
    captions = {}
    for i in range(n):
        name = f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / name, quality=90)
        captions[name] = [" ".join(rng.choice(vocab_words, WORDS)) for _ in range(CAPTIONS)]
    return Corpus(folder, captions)


@torch.no_grad()
def calibrate_batchnorm(body: torch.nn.Module, images: torch.Tensor) -> None:
    """Give a random ResNet body's BatchNorm layers the statistics of one batch. Untouched, random weights
    grow the features with depth (to ~1e8, past fp16); speed does not depend on the values."""
    norms = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    body.train()
    body(images)
    body.eval()
    for m in norms:
        m.momentum = 0.1


def reference_epoch(model, dataset: CaptionDataset, optimizer, device, rows_per_step: int = 32) -> None:
    """One row per caption, shuffled; each row's image is opened and encoded again, in fp32."""
    rows = [(i, j) for i in range(len(dataset)) for j in range(CAPTIONS)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    for start in range(0, len(rows), rows_per_step):
        items = []
        for k in order[start:start + rows_per_step]:
            i, j = rows[k]
            image, captions, name = dataset[i]                  # decode + transform per row, as the reference did
            items.append((image, [captions[j]], name))
        batch = collate(items).to(device)
        batch = Batch(batch.tokens, None, batch.names, images=batch.images)   # no sharing: the ResNet runs per row
        loss, _ = caption_loss(model, batch, "fp32", device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternated; medians reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--extract-images", type=int, default=PROBE_MIN_IMAGES,
                        help="images for the extraction engines' comparison (CPU, [export] extra; 0: skip)")
    parser.add_argument("--extract-precisions", default="auto,fp32", help="comma-separated, for that comparison")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    precision = resolve_precision("auto", device)

    rng = np.random.default_rng(0)
    vocab_words = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    vocab = Vocabulary(list(SPECIALS) + vocab_words)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        corpus = make_data(tmp / "images", args.images, vocab_words, rng)
        cfg = from_dict({"data": {"format": "csv", "images": str(tmp / "images"), "max_words": WORDS},
                         "model": {"pretrained": False},
                         "train": {"precision": "auto", "num_workers": 0, "batch_size": STEP_IMAGES,
                                   "cache_features": True}},
                        check_paths=False)
        names = sorted(corpus.captions)
        dataset = CaptionDataset(corpus, names, vocab, cfg.data.image_size, cfg.data.max_words)

        def fresh():
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, len(vocab), vocab.pad).to(device)
            calibrate_batchnorm(model.encoder.body,
                                torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]).to(device))
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                         fused=device.type in ("cpu", "cuda"))
            return model, optimizer

        caches = []                                 # ours: each run's cache seconds and the engine that made it

        def ours(state) -> None:
            model, optimizer = state
            start = time.perf_counter()
            cache = extract_features(cfg, names, corpus.images_dir, tmp / f"features{len(caches)}",   # a new cache
                                     encoder=model.encoder, batch_size=32, device=device, precision=precision,
                                     progress=False)
            sync()
            caches.append((time.perf_counter() - start, cache.meta["engine"]))
            loader = build_loader(FeatureDataset(cache, dataset), batch_size=cfg.train.batch_size, shuffle=True,
                                  num_workers=0, pad_id=vocab.pad)
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            scheduler = build_scheduler(cfg, optimizer, len(loader))
            train_one_epoch(model, loader, optimizer, scheduler, scaler, TrainState(), precision=precision,
                            device=device, progress=False)

        # alternated, so that a slow spell of the machine falls on both; each run on a fresh model (built untimed)
        times = common.in_turns({"reference": lambda state: reference_epoch(state[0], dataset, state[1], device),
                                 "ours": ours}, args.repeats, warmup=0, sync=sync,
                                prepare={"reference": fresh, "ours": fresh}, progress=True)
        t_reference, t_ours = statistics.median(times["reference"]), statistics.median(times["ours"])
        t_cache = statistics.median(c for c, _ in caches)
        t_epoch = statistics.median(o - c for o, (c, _) in zip(times["ours"], caches))
        engine = caches[-1][1]
        extraction = compare_extraction(args, tmp, vocab_words, rng, fresh, device) \
            if device.type == "cpu" and args.extract_images else []

    n, rows = args.images, args.images * CAPTIONS
    env = common.machine(device, precision)
    print(f"device {device}, precision {precision}, {torch.get_num_threads()} threads, "
          f"{n} images x {CAPTIONS} captions")
    print(f"reference (ResNet per caption row, fp32): {t_reference:8.1f} s   {n / t_reference:6.2f} images/s")
    print(f"ours (cache + epoch on features):         {t_ours:8.1f} s   {n / t_ours:6.2f} images/s")
    print(f"  of which the feature cache:             {t_cache:8.1f} s; the epoch itself {t_epoch:.1f} s, "
          f"the cache extracted by {engine['engine']} ({engine.get('why', 'timed')})")
    for line in extraction:
        print(line["text"])
    figures = {"speedup_vs_reference": f"{t_reference / t_ours:.1f}", "reference_s": f"{t_reference:.1f}",
               "ours_s": f"{t_ours:.1f}", "cache_s": f"{t_cache:.1f}", "epoch_s": f"{t_epoch:.1f}", "rows": rows,
               "precision": precision, "cache_engine": engine["engine"]}
    common.finish("train", figures | {k: v for line in extraction for k, v in line["keys"].items()}, env, args.json)


def compare_extraction(args, tmp: Path, vocab_words: list[str], rng, fresh, device) -> list[dict]:
    """The extraction engines on --extract-images images, at each precision: PyTorch, ONNX Runtime, and auto."""
    import importlib.util
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")):
        return [{"text": "extraction engines: skipped, onnxruntime not installed (pip install -e '.[export]')",
                 "keys": {}}]
    (tmp / "extract").mkdir()
    corpus = make_data(tmp / "extract", args.extract_images, vocab_words, rng)
    cfg = from_dict({"data": {"format": "csv", "images": str(tmp / "extract")}, "model": {"pretrained": False},
                     "train": {"num_workers": 0}}, check_paths=False)
    names, encoder = sorted(corpus.captions), fresh()[0].encoder
    lines = []
    for precision in args.extract_precisions.split(","):
        resolved, seconds = resolve_precision(precision, device), {}
        for engine in ("torch", "onnxruntime", "auto"):
            start = time.perf_counter()
            cache = extract_features(cfg, names, corpus.images_dir, tmp / f"extract-{precision}-{engine}",
                                     encoder=encoder, batch_size=32, device=device, precision=resolved,
                                     progress=False, engine=engine)
            seconds[engine], choice = time.perf_counter() - start, cache.meta["engine"]
        n, probe = len(names), choice.get("probe", {})
        lines.append({"text": f"extraction, {n} images, PyTorch at {resolved}: PyTorch {n / seconds['torch']:.2f} "
                              f"img/s, ONNX Runtime fp32 {n / seconds['onnxruntime']:.2f} img/s (export included), "
                              f"auto {n / seconds['auto']:.2f} img/s, which chose {choice['engine']} (its probe: "
                              f"{json.dumps(probe)})",
                      "keys": {f"extract_{resolved}_engine": choice["engine"],
                               f"extract_{resolved}_auto_vs_torch": f"{seconds['torch'] / seconds['auto']:.2f}",
                               f"extract_{resolved}_ort_vs_torch": f"{seconds['torch'] / seconds['onnxruntime']:.2f}"}})
        print(lines[-1]["text"], flush=True)
    return lines


if __name__ == "__main__":
    main()
