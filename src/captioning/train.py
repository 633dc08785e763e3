"""The training loop: plain functions, no trainer framework.

`train_one_epoch` and `evaluate_loss` return dicts of averages; `fit` composes
them with Adam, ExponentialLR stepped per epoch, early stopping and best.pt on
the monitored value (validation cross-entropy, the reference's choice, or
validation CIDEr with `train.monitor=cider`), checkpoints, history and plots.
`fit(cfg, resume=RUN_DIR)` continues a run from its `last.pt`.

Under `torchrun --nproc_per_node=N -m captioning train ...` the same loop runs
DistributedDataParallel: `train.batch_size` stays the global batch (each
process takes its share), the loss is the mean over the global batch's tokens
(so N processes take the steps one process would), losses are summed across
processes, and only rank 0 writes files, from the unwrapped model.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import model_checkpoint, read_checkpoint, rng_state, save_atomic, set_rng_state
from .config import Config, from_dict, save_config
from .data import CaptionDataset, build_loader, load_splits, make_splits, read_corpus, save_splits
from .decoding import greedy
from .features import FeatureDataset, extract_features
from .device import autocast, resolve_device, resolve_precision
from .metrics import score_captions
from .model import CaptionModel, build_model, count_parameters
from .plots import plot_history
from .vocab import Vocabulary

log = logging.getLogger(__name__)
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_cider", "lr", "seconds")   # val_cider: monitor=cider


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf: the run stops rather than save a broken model."""


def caption_loss(model: CaptionModel, batch, precision: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """Mean next-word cross-entropy over the batch's real tokens, and their count.

    Training and validation call this same function.
    """
    inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
    features = batch.images.float() if batch.images.dim() == 3 else None  # (B, L, C) from the feature cache
    with autocast(precision, device):
        logits = model(batch.images, inputs, batch.image_index, features=features)   # (N, T-1, V)
    pad_id = getattr(model, "module", model).pad_id          # model may be wrapped in DDP
    n_tokens = int((targets != pad_id).sum())
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id)
    return loss, n_tokens


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_sum(*values: float) -> list[float]:
    """Sums over all processes (the values themselves with one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model, loader, optimizer, scaler, precision, device, epoch: int, grad_clip: float = 0.0,
                    progress: bool = True, totals: tuple[float, int] = (0.0, 0), on_step=None) -> dict:
    """One pass over `loader`. `totals` (summed loss x tokens, tokens) carries the part of the epoch a
    resumed run already did; `on_step(total, n_total)` runs after every optimizer step (checkpoints)."""
    model.train()
    total, n_total = totals
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        loss, n = caption_loss(model, batch.to(device), precision, device)
        value = loss.item()
        if world_size() > 1:
            # the global batch's mean per token: DDP averages gradients over processes, so weigh each
            # process's mean by its share of the tokens (times the world size)
            summed, n_all = _all_sum(value * n, n)
            loss = loss * (n * world_size() / n_all)
            value, n = summed / n_all, int(n_all)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at epoch {epoch}, step {step}: stopping without "
                                     "saving. Try a lower train.lr, train.grad_clip, or train.precision=fp32.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total, n_total = total + value * n, n_total + n
        if on_step is not None:
            on_step(total, n_total)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {"loss": total / max(n_total, 1), "tokens": n_total, "steps": len(loader)}


@torch.no_grad()
def evaluate_loss(model, loader, precision, device, progress: bool = False) -> dict:
    model.eval()
    total, n_total = 0.0, 0
    for batch in tqdm(loader, desc="val", disable=not progress, leave=False):
        loss, n = caption_loss(model, batch.to(device), precision, device)
        total, n_total = total + loss.item() * n, n_total + n
    total, n_total = _all_sum(total, n_total)        # each process scored its shard of the images
    return {"loss": total / max(n_total, 1), "tokens": int(n_total)}


@torch.no_grad()
def predict_captions(model, loader, vocab: Vocabulary, precision, device, max_len: int) -> dict[str, str]:
    """Greedy captions of every image the loader yields, by name."""
    model.eval()
    predictions = {}
    for batch in loader:
        images = batch.images.to(device)
        with autocast(precision, device):
            memory = model.memory(images.float()) if images.dim() == 3 else model.encode(images)
        ids = greedy(model, memory.float(), vocab.bos, vocab.eos, max_len)
        predictions.update(zip(batch.names, map(vocab.decode, ids)))
    return predictions


def val_cider(model, dataset: CaptionDataset, vocab: Vocabulary, cfg: Config, precision, device) -> float:
    """CIDEr-D of greedy captions over the first train.eval_images val images (0 = all), scored at once."""
    n = cfg.train.eval_images or len(dataset)
    subset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    loader = build_loader(subset, cfg.train.batch_size, False, cfg.train.num_workers, pad_id=vocab.pad)
    predictions = predict_captions(model, loader, vocab, precision, device, cfg.data.max_len)
    references = {dataset.names[i]: dataset.references[i] for i in subset.indices}
    return score_captions(predictions, references, metrics=("CIDEr",))[0]["CIDEr"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_history(history: list[dict], run_dir: Path) -> None:
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    plot_history(history, run_dir)


def prepare(cfg: Config, run_dir: Path, resume_ckpt: dict | None, rank: int = 0):
    """Data, splits and vocabulary of a run: made fresh, or read back when resuming."""
    corpus = read_corpus(cfg)
    if resume_ckpt is not None:
        splits = load_splits(run_dir / "splits.json")
        vocab = Vocabulary.from_list(resume_ckpt["vocab"])
    else:
        splits = make_splits(corpus, cfg)
        # built from training captions only: validation and test words stay unseen
        vocab = Vocabulary.build((c for n in splits["train"] for c in corpus.captions[n]), cfg.data.min_freq)
        if rank == 0:                  # every process makes the same splits (seeded); one writes them
            save_splits(splits, run_dir / "splits.json")
    for split in ("train", "val"):
        if not splits[split]:
            raise ValueError(f"the {split} split is empty: check data.val_fraction and the data set size")
    datasets = {s: CaptionDataset(corpus, splits[s], vocab, cfg.data.image_size, cfg.data.max_len)
                for s in ("train", "val")}
    return corpus, datasets, vocab


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))) if world > 1 else (0, 1, 0)


def fit(cfg: Config, resume: str | Path | None = None, overrides: list[str] = (), progress: bool = True) -> Path:
    """Train (or continue) a run; returns its run directory."""
    rank, world, local_rank = init_distributed()
    progress = progress and rank == 0
    resume_ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        resume_ckpt = read_checkpoint(run_dir / "last.pt")
        cfg = from_dict(resume_ckpt["config"], overrides)  # e.g. --set train.epochs=40 to go on longer
    else:
        run_dir = Path(cfg.run_dir)
        if (run_dir / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                                  "or choose another run_dir")
    if world > 1 and cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
                         f"{world} processes")
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.train.precision, device)

    corpus, datasets, vocab = prepare(cfg, run_dir, resume_ckpt, rank)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    model = build_model(cfg.model, len(vocab), vocab.pad).to(device)
    if cfg.train.cache_features:
        # the frozen ResNet once per image (resumable; reused while its key holds), then never again;
        # rank 0 extracts, the others wait and then find the cache complete
        for turn in (0, 1):
            if (rank == 0) == (turn == 0):
                cache = extract_features(cfg, sorted(corpus.captions), corpus.images_dir, cfg.data.features_dir,
                                         encoder=model.encoder, device=device, precision=precision, progress=progress)
            if world > 1:
                dist.barrier()
        datasets = {s: FeatureDataset(cache, d) for s, d in datasets.items()}
    trainable, frozen = count_parameters(model)
    log.info("%d train / %d val images, %d words, %.1f M trainable + %.1f M frozen parameters, %s on %s",
             len(datasets["train"]), len(datasets["val"]), len(vocab), trainable / 1e6, frozen / 1e6, precision, device)

    # DDP wraps the model for the training steps; everything else (checkpoints, validation) uses it as is
    net = model if world == 1 else DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                           else None)
    # fused: one kernel for all parameters instead of ~10 per tensor (5x faster steps on the CPU)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.train.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # best_val: the best monitored value so far (val loss: lower is better; CIDEr: higher)
    sign = 1.0 if cfg.train.monitor == "val_loss" else -1.0
    history, best_val, bad_epochs, start_epoch, step = [], sign * math.inf, 0, 1, 0
    skip, totals = 0, (0.0, 0)          # a mid-epoch checkpoint: batches of start_epoch done, and their loss sums
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        history, best_val, bad_epochs = resume_ckpt["history"], resume_ckpt["best_val"], resume_ckpt["bad_epochs"]
        start_epoch, step = resume_ckpt["epoch"] + 1, resume_ckpt["step"]
        skip, totals = resume_ckpt.get("batch", 0), tuple(resume_ckpt.get("epoch_totals", (0.0, 0)))
        set_rng_state(resume_ckpt["rng"])   # last: nothing below draws from the global RNGs before training

    t = cfg.train

    def save_last(epoch_done: int, batch: int = 0, epoch_totals=(0.0, 0)) -> None:
        """last.pt: everything to go on from here, `batch` batches into epoch epoch_done + 1."""
        if rank != 0:
            return
        save_atomic(model_checkpoint(
            model, cfg, vocab, epoch=epoch_done, step=step, batch=batch, epoch_totals=list(epoch_totals),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
            rng=rng_state(), history=history, best_val=best_val, bad_epochs=bad_epochs), run_dir / "last.pt")

    val_loader = build_loader(datasets["val"], t.batch_size, False, t.num_workers, pad_id=vocab.pad, rank=rank,
                              world=world)
    for epoch in range(start_epoch, t.epochs + 1):
        if t.patience and bad_epochs >= t.patience:
            break
        start = time.time()
        train_loader = build_loader(datasets["train"], t.batch_size, True, t.num_workers, cfg.seed, epoch, vocab.pad,
                                    skip_batches=skip, rank=rank, world=world)
        lr = optimizer.param_groups[0]["lr"]
        batch = skip

        def on_step(total: float, n_total: int) -> None:
            nonlocal step, batch
            step, batch = step + 1, batch + 1
            if t.save_every and step % t.save_every == 0 and batch < len(train_loader) + skip:
                save_last(epoch - 1, batch, (total, n_total))

        train_stats = train_one_epoch(net, train_loader, optimizer, scaler, precision, device, epoch,
                                      t.grad_clip, progress, totals, on_step)
        skip, totals = 0, (0.0, 0)
        val_stats = evaluate_loss(model, val_loader, precision, device)
        cider = None
        if t.monitor == "cider" and (epoch % t.eval_every == 0 or epoch == t.epochs):
            cider = val_cider(model, datasets["val"], vocab, cfg, precision, device)
        scheduler.step()
        history.append({"epoch": epoch, "train_loss": round(train_stats["loss"], 5),
                        "val_loss": round(val_stats["loss"], 5), "val_cider": "" if cider is None else round(cider, 5),
                        "lr": lr, "seconds": round(time.time() - start, 2)})
        if rank == 0:
            write_history(history, run_dir)
        value = val_stats["loss"] if t.monitor == "val_loss" else cider
        improved = False
        if value is not None:       # monitor=cider counts only the epochs it was computed
            improved = sign * value < sign * best_val
            best_val, bad_epochs = (value, 0) if improved else (best_val, bad_epochs + 1)
        if improved and rank == 0:
            save_atomic(model_checkpoint(model, cfg, vocab, epoch=epoch, val_loss=val_stats["loss"], val_cider=cider),
                        run_dir / "best.pt")
        save_last(epoch)
        msg = (f"epoch {epoch}: train {train_stats['loss']:.4f}  val {val_stats['loss']:.4f}  "
               f"{'' if cider is None else f'CIDEr {cider:.3f}  '}lr {lr:.2e}  "
               f"{history[-1]['seconds']:.0f}s{'  *best' if improved else ''}")
        if rank == 0:
            (tqdm.write if progress else log.info)(msg)
    if world > 1:
        dist.barrier()                # the files are written before any process returns
    return run_dir
