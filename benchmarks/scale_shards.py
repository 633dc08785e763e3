"""scale.py --shards: training from WebDataset shards against training from the images' folder.

The stand-in is written once as shards (`write_shards`, what `python -m captioning shards` runs; kept
under --data/shards, written again when its training split is not the stand-in's). Then
`train_one_epoch` takes --shards-steps steps of 32 images from each source in turns (common.medians,
--rounds rounds after a warm-up), every round from a new loader built as a run builds it (`any_loader`:
the folder's CaptionDataset, the shards' ShardSplit as `prepare_stream` makes it) with the same
train.num_workers (2), the same model and optimizer: a small model (frozen resnet18, d_model 128), so that
reading the images weighs as much as it can; on a CPU the model still sets much of the pace
(--shards-image-size 64 lightens it), on a GPU (--device cuda) the loader does.
"""
from __future__ import annotations

import functools
import itertools
import json
import time
from pathlib import Path

import torch

import common
from captioning.config import from_dict
from captioning.data.dataset import CaptionDataset
from captioning.data.shards import write_shards
from captioning.data.stream import any_loader, prepare_stream
from captioning.device import resolve_device
from captioning.model.caption_model import build_model
from captioning.train.loop import TrainState, build_optimizer, build_scheduler, train_one_epoch

BATCH = 32


class First:
    """A loader's first n batches, sized as train_one_epoch wants."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


def write_once(cfg, shards: Path, train_names: list[str], shard_size: int, report) -> None:
    index = shards / "index.json"
    found = json.loads(index.read_text()) if index.is_file() else {}
    if found.get("splits", {}).get("train", {}).get("names") == train_names:
        return
    start = time.perf_counter()
    write_shards(cfg, shards, shard_size=shard_size, progress=False)
    report("shards written", time.perf_counter() - start, f"{shard_size} images a shard, in {shards}")


def stage_shards(cfg, folder: Path, corpus, splits, vocab, args, report) -> dict:
    """Images/s of training steps reading the training split from the folder and from shards."""
    shards, size, workers = folder / "shards", args.shards_image_size, cfg.train.num_workers
    write_once(cfg, shards, splits["train"], args.shard_size, report)
    stream = from_dict({"data": {"format": "webdataset", "shards": str(shards), "image_size": size},
                        "train": {"num_workers": workers}}, check_paths=False)
    _, datasets, _ = prepare_stream(stream, folder / "shards_run", vocab, resume=True)
    sources = {"folder": CaptionDataset(corpus, splits["train"], vocab, size, cfg.data.max_words),
               "shards": datasets["train"]}
    small = from_dict({"model": {"backbone": "resnet18", "pretrained": False, "train_backbone": False,
                                 "d_model": 128, "num_heads": 4, "dim_feedforward": 512}}, check_paths=False)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(small.model, len(vocab), 0).to(device)
    optimizer, epochs = build_optimizer(small, model), itertools.count()
    scheduler = build_scheduler(small, optimizer, args.shards_steps)

    def steps(name: str) -> None:
        loader = any_loader(sources[name], batch_size=BATCH, shuffle=True, num_workers=workers, seed=0,
                            epoch=next(epochs), pad_id=vocab.pad)
        train_one_epoch(model, First(loader, args.shards_steps), optimizer, scheduler,
                        torch.amp.GradScaler(device.type, enabled=False), TrainState(), precision="fp32",
                        device=device, progress=False)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    seconds = common.medians({name: functools.partial(steps, name) for name in sources}, args.rounds,
                             sync=sync, progress=True)
    rates = {name: BATCH * args.shards_steps / s for name, s in seconds.items()}
    report("shards vs folder", sum(seconds.values()), f"{args.shards_steps} steps of {BATCH} images at {size} px "
           f"on {device}, {workers} workers: folder {rates['folder']:.1f}, shards {rates['shards']:.1f} images/s")
    return {"images": len(splits["train"]), "steps": args.shards_steps, "image_size": size, "workers": workers,
            "folder_img_s": f"{rates['folder']:.1f}", "shards_img_s": f"{rates['shards']:.1f}",
            "shards_vs_folder": f"{rates['shards'] / rates['folder']:.2f}"}
