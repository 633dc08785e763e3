"""The training loop: plain functions over a `TrainState`, no trainer framework.

    train(cfg)                      a new run in cfg.run_dir
    resume(run_dir, overrides)      continue a run from its last.pt (bit-exact after a kill)

`train_one_epoch` and `evaluate_loss` return dicts of averages; `_fit` composes
them with the optimizer and schedule of `build_optimizer` / `build_scheduler`
(the reference's Adam + ExponentialLR per epoch by default), early stopping and
best.pt on the monitored value (validation cross-entropy, the reference's
choice, or validation CIDEr with `train.monitor=cider`), checkpoints, history
and plots. Everything that changes as a run goes on and must survive a kill
(epoch, step, position in the epoch, running totals, history, best value) is
one `TrainState`, saved in last.pt with the optimizer, scheduler, scaler and
RNG states.

Under `torchrun --nproc_per_node=N -m captioning train ...` the same loop runs
DistributedDataParallel (distributed.py): `train.batch_size` stays the global
batch (each process takes its share), the loss is the mean over the global
batch's tokens (so N processes take the steps one process would), losses are
summed across processes, and only rank 0 writes files, from the unwrapped model.
"""
from __future__ import annotations

import csv
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .captioner import Captioner
from .checkpoint import checkpoint_path, model_checkpoint, read_checkpoint, rng_state, save_atomic, set_rng_state
from .config import Config, ConfigError, absolute_paths, flatten, from_dict, read_yaml_config, save_config, to_dict
from .data import CaptionDataset, build_loader, load_splits, make_splits, read_corpus, save_splits
from .decoding import Rules
from .device import autocast, resolve_device, resolve_precision
from .env import write_env
from .features import FeatureDataset, extract_features
from .metrics import score_captions
from .model import CaptionModel, build_model, count_parameters
from .plots import plot_history
from .reward import CiderD
from .scst import ScstObjective, reference_ids
from .vocab import Vocabulary

log = logging.getLogger(__name__)
CIDER_FILE = "cider_df.json"     # objective=scst: CIDEr-D's document frequencies of the training split
# val_cider: monitor=cider; reward, baseline: objective=scst (the means over the epoch's samples)
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_cider", "reward", "baseline", "lr", "seconds")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf: the run stops rather than save a broken model."""


# ---------------------------------------------------------------- one step, one epoch

def caption_loss(model: CaptionModel, batch, precision: str, device: torch.device,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean next-word cross-entropy over the batch's real tokens, and their count.

    Training and validation call this same function (validation without label smoothing).
    """
    inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
    with autocast(precision, device):
        logits = model(inputs, batch.image_index, **batch.model_inputs())   # (N, T-1, V)
    pad_id = getattr(model, "module", model).pad_id          # model may be wrapped in DDP
    n_tokens = int((targets != pad_id).sum())
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing)
    return loss, n_tokens


def _global_mean(loss: torch.Tensor, n: int) -> tuple[torch.Tensor, float, int]:
    """(loss to backpropagate, its value, tokens) over all processes' batches of this step.

    DDP averages gradients over processes, so each process's mean is weighed by its share of the
    tokens (times the world size): the gradient is the global batch's mean per token.
    """
    value, world = loss.item(), distributed.world_size()
    if world == 1:
        return loss, value, n
    summed, n_all = distributed.all_sum(value * n, n)
    return loss * (n * world / n_all), summed / n_all, int(n_all)


class CrossEntropy:
    """train.objective=xe: `objective(net, batch)` -> (mean cross-entropy, tokens, {})."""

    def __init__(self, precision: str, device: torch.device, label_smoothing: float = 0.0):
        self.precision, self.device, self.label_smoothing = precision, device, label_smoothing

    def __call__(self, net, batch) -> tuple[torch.Tensor, int, dict]:
        return *caption_loss(net, batch, self.precision, self.device, self.label_smoothing), {}


def train_one_epoch(net, loader, optimizer, scheduler, scaler, state: TrainState, *, precision: str,
                    device: torch.device, grad_clip: float = 0.0, label_smoothing: float = 0.0,
                    progress: bool = True, on_step=None, objective=None) -> dict:
    """One pass over `loader`, which starts at batch `state.batch` of epoch `state.epoch + 1`.

    `objective(net, batch)` gives each step's loss (default: cross-entropy, `CrossEntropy`; scst.py's
    `ScstObjective` for self-critical training). Every optimizer step advances `state` (step,
    batch, running totals) and the scheduler, then calls `on_step()` (mid-epoch checkpoints).
    """
    objective = objective or CrossEntropy(precision, device, label_smoothing)
    net.train()
    epoch = state.epoch + 1
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for batch in bar:
        loss, n, sums = objective(net, batch.to(device))
        loss, value, n = _global_mean(loss, n)
        if sums and distributed.world_size() > 1:      # every process keeps the same totals, whichever saves them
            sums = dict(zip(sums, distributed.all_sum(*sums.values())))
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at epoch {epoch}, batch {state.batch}: stopping without "
                                     "saving. Try a lower train.lr, train.grad_clip, or train.precision=fp32.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.advance(value * n, n, sums)
        if on_step is not None:
            on_step()
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {"loss": state.loss_sum / max(state.tokens, 1), "tokens": state.tokens, "steps": len(loader)}


@torch.no_grad()
def evaluate_loss(model, loader, precision, device, progress: bool = False) -> dict:
    model.eval()
    total, n_total = 0.0, 0
    for batch in tqdm(loader, desc="val", disable=not progress, leave=False):
        loss, n = caption_loss(model, batch.to(device), precision, device)
        total, n_total = total + loss.item() * n, n_total + n
    total, n_total = distributed.all_sum(total, n_total)        # each process scored its shard of the images
    return {"loss": total / max(n_total, 1), "tokens": int(n_total)}


def val_cider(model, dataset: CaptionDataset, vocab: Vocabulary, cfg: Config, precision, device) -> float:
    """CIDEr-D of the captions (beam train.eval_beam; 1: greedy) of the first train.eval_images val images
    (0 = all), scored at once.

    The captions come from the Captioner's own prediction path, as `evaluate`'s do.
    """
    n = cfg.train.eval_images or len(dataset)
    subset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    loader = build_loader(subset, batch_size=cfg.train.batch_size, shuffle=False, num_workers=cfg.train.num_workers,
                          pad_id=vocab.pad)
    captioner = Captioner(model, vocab, cfg, device=device, precision=precision)
    predictions = {}
    for batch in loader:
        predictions.update(zip(batch.names, captioner.predict(**batch.model_inputs(), beam_size=cfg.train.eval_beam)))
    references = {dataset.names[i]: dataset.references[i] for i in subset.indices}
    return score_captions(predictions, references, metrics=("CIDEr",))[0]["CIDEr"]


# ---------------------------------------------------------------- optimizer, schedule, state

def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (the reference's) or AdamW over the trainable parameters, at train.lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for all parameters instead of ~10 per tensor (5x faster steps on the CPU)
    return kind(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)


def lr_factor(cfg: Config, steps_per_epoch: int, state: TrainState | None = None):
    """step -> the factor of train.lr for the optimizer step after `step` steps (plateau: and `state`'s drops)."""
    t = cfg.train
    total = max(t.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        if t.scheduler == "constant":
            return warm
        if t.scheduler == "plateau":                          # gamma after each evaluation that did not improve
            return warm * t.gamma ** (state.lr_drops if state is not None else 0)
        if t.scheduler == "cosine":
            done = min(max(step - t.warmup_steps, 0) / max(total - t.warmup_steps, 1), 1.0)
            return warm * 0.5 * (1.0 + math.cos(math.pi * done))
        return warm * t.gamma ** (step // steps_per_epoch)      # exponential: gamma once per epoch

    return factor


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    state: TrainState | None = None):
    """The learning rate of every optimizer step: LambdaLR over `lr_factor`, stepped after each step.

    The default (train.scheduler=exponential, no warmup) is the reference's ExponentialLR(gamma)
    stepped once per epoch: the factor is gamma ** (epochs done). `plateau` (ReduceLROnPlateau's
    rule, with patience 0) reads its drops from `state`, which last.pt keeps.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch, state))


def load_scheduler_state(scheduler, saved: dict, step: int) -> None:
    """Scheduler state from last.pt; checkpoints from before build_scheduler hold ExponentialLR's, per epoch."""
    if "gamma" in saved:                          # ExponentialLR: it counted epochs, LambdaLR counts steps
        saved = {k: v for k, v in saved.items() if k != "gamma"} | {"last_epoch": step, "_step_count": step + 1}
        saved.setdefault("lr_lambdas", [None] * len(scheduler.base_lrs))
    scheduler.load_state_dict(saved)


@dataclass
class TrainState:
    """Where a run stands; saved in last.pt, so a resumed run goes on exactly where it stopped."""
    epoch: int = 0                  # epochs finished
    step: int = 0                   # optimizer steps taken in all
    batch: int = 0                  # batches of epoch + 1 taken (a mid-epoch checkpoint)
    loss_sum: float = 0.0           # of epoch + 1 so far: summed loss x tokens, and the tokens
    tokens: int = 0
    history: list[dict] = field(default_factory=list)
    best: float | None = None       # the best monitored value so far
    bad_epochs: int = 0             # evaluations since it last improved
    sums: dict = field(default_factory=dict)   # of epoch + 1 so far: the objective's other sums (scst: rewards)
    lr_drops: int = 0               # scheduler=plateau: evaluations that did not improve, each a factor gamma

    def advance(self, loss_sum: float, tokens: int, sums: dict | None = None) -> None:
        self.step, self.batch = self.step + 1, self.batch + 1
        self.loss_sum, self.tokens = self.loss_sum + loss_sum, self.tokens + tokens
        for key, value in (sums or {}).items():
            self.sums[key] = self.sums.get(key, 0) + value

    def end_epoch(self, row: dict) -> None:
        self.epoch, self.batch, self.loss_sum, self.tokens, self.sums = self.epoch + 1, 0, 0.0, 0, {}
        self.history.append(row)

    def record(self, value: float | None, lower_is_better: bool) -> bool:
        """Count a monitored value (None: not evaluated this epoch); True when it is the best so far."""
        if value is None:
            return False
        improved = self.best is None or (value < self.best if lower_is_better else value > self.best)
        self.best, self.bad_epochs = (value, 0) if improved else (self.best, self.bad_epochs + 1)
        return improved

    def finished(self, cfg: Config) -> bool:
        """All epochs trained, or stopped early: train.patience evaluations without improvement."""
        return self.epoch >= cfg.train.epochs or bool(cfg.train.patience and self.bad_epochs >= cfg.train.patience)

    def state_dict(self) -> dict:
        # the names last.pt has always used, so older checkpoints resume and newer ones read the same
        return {"epoch": self.epoch, "step": self.step, "batch": self.batch,
                "epoch_totals": [self.loss_sum, self.tokens], "history": self.history,
                "best_val": math.nan if self.best is None else self.best, "bad_epochs": self.bad_epochs,
                "epoch_sums": dict(self.sums), "lr_drops": self.lr_drops}

    def load_state_dict(self, d: dict) -> None:
        best = d.get("best_val")
        self.epoch, self.step, self.batch = d["epoch"], d["step"], d.get("batch", 0)
        self.loss_sum, self.tokens = (float(x) for x in d.get("epoch_totals", (0.0, 0)))
        self.tokens = int(self.tokens)
        self.history, self.bad_epochs = list(d.get("history", [])), d.get("bad_epochs", 0)
        self.best = None if best is None or not math.isfinite(best) else best
        self.sums, self.lr_drops = dict(d.get("epoch_sums", {})), d.get("lr_drops", 0)


# ---------------------------------------------------------------- a run

@dataclass
class Run:
    """Everything one training process holds for a run."""
    cfg: Config
    run_dir: Path
    device: torch.device
    precision: str
    vocab: Vocabulary
    datasets: dict
    model: CaptionModel
    net: torch.nn.Module            # the model as the training steps call it (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: TrainState
    rank: int = 0
    world: int = 1
    paths_given: dict = field(default_factory=dict)     # config paths as given, before they were made absolute
    objective: object = None        # objective(net, batch) -> (loss, n, sums): CrossEntropy or scst.ScstObjective

    def loader(self, split: str, epoch: int = 0, skip_batches: int = 0):
        t = self.cfg.train
        return build_loader(self.datasets[split], batch_size=t.batch_size, shuffle=split == "train",
                            num_workers=t.num_workers, seed=self.cfg.seed, epoch=epoch, pad_id=self.vocab.pad,
                            skip_batches=skip_batches, rank=self.rank, world=self.world)

    def save_last(self) -> None:
        """last.pt: everything to go on from here."""
        if self.rank == 0:
            save_atomic(model_checkpoint(
                self.model, self.cfg, self.vocab, **self.state.state_dict(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), rng=rng_state(),
                paths_given=self.paths_given),
                self.run_dir / "last.pt")


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


def prepare_data(cfg: Config, run_dir: Path, vocab: Vocabulary | None, rank: int = 0,
                 splits: dict | None = None, resume: bool | None = None):
    """Corpus, train/val datasets and vocabulary of a run: made fresh, read back on resume (from the run
    directory), or taken from the checkpoint a run starts from (`vocab` and that run's `splits` given)."""
    resume = vocab is not None and splits is None if resume is None else resume
    with distributed.rank_zero_first(rank):           # rank 0 may generate Shapes; the others then read it
        corpus = read_corpus(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)         # once the data is found: a typo leaves no folder behind
    if resume:
        splits = load_splits(run_dir / "splits.json")
    splits = splits or make_splits(corpus, cfg)
    _check_split_images(splits, corpus, cfg)
    if vocab is None:                  # built from training captions only: validation and test words stay unseen
        vocab = Vocabulary.build((c for n in splits["train"] for c in corpus.captions[n]), cfg.data.min_freq)
    if rank == 0 and not resume:       # every process makes the same splits (seeded); one writes them
        save_splits(splits, run_dir / "splits.json")
    for split in ("train", "val"):
        if not splits[split]:
            raise ValueError(f"the {split} split is empty: check data.val_fraction and the data set size")
    datasets = {s: CaptionDataset(corpus, splits[s], vocab, cfg.data.image_size, cfg.data.max_words)
                for s in ("train", "val")}
    return corpus, datasets, vocab


def _check_split_images(splits: dict, corpus, cfg: Config) -> None:
    unknown = [n for names in splits.values() for n in names if n not in corpus.captions]
    if unknown:
        raise ConfigError(f"{len(unknown)} image(s) of the run's splits (e.g. {unknown[0]}) are not in "
                          f"data.captions={cfg.data.captions}: the splits come from "
                          f"{'train.init_from' if cfg.train.init_from else 'the run'}, whose data this run must read")


def _cached(cfg: Config, corpus, datasets: dict, model: CaptionModel, device, precision, rank: int, progress: bool):
    """The datasets read from the frozen encoder's feature cache, built first when missing.

    The ResNet runs once per image (resumable; reused while its key holds), then never again;
    rank 0 extracts the features while the other processes wait, then they find the cache complete.
    """
    with distributed.rank_zero_first(rank):
        cache = extract_features(cfg, sorted(corpus.captions), corpus.images_dir, cfg.data.features_dir,
                                 encoder=model.encoder, device=device, precision=precision,
                                 progress=progress and rank == 0)
    return {s: FeatureDataset(cache, d) for s, d in datasets.items()}


# model keys a run started from a checkpoint may change: its weights come from the checkpoint
INIT_FREE_MODEL_KEYS = ("pretrained", "dropout", "train_backbone")


def read_init(cfg: Config) -> tuple[dict, Vocabulary, dict | None]:
    """train.init_from (a checkpoint, or a run directory: its best.pt): its checkpoint, vocabulary and its
    run's splits (None, with a warning, when no splits.json lies beside it: the splits are made again).

    The config's model and image size must be the checkpoint's: a key that differs is an error naming it.
    """
    try:
        path = checkpoint_path(cfg.train.init_from)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'train.init_from': {e}") from None
    ckpt = read_checkpoint(path)
    saved = from_dict(ckpt["config"], check_paths=False, source=str(path))
    pairs = [(f"model.{k}", getattr(cfg.model, k), v) for k, v in to_dict(saved.model).items()
             if k not in INIT_FREE_MODEL_KEYS] + [("data.image_size", cfg.data.image_size, saved.data.image_size)]
    for key, ours, theirs in pairs:
        if ours != theirs:
            raise ConfigError(f"config key '{key}': {ours!r}, but train.init_from={path} was trained with "
                              f"{theirs!r}: the model starts from its weights, so set {key}={theirs}")
    if not (path.parent / "splits.json").is_file():
        log.warning("no splits.json beside %s: the splits are made from data.split_seed; if that run split its "
                    "images otherwise, this run's val and test images may be some it trained on", path)
        return ckpt, Vocabulary.from_list(ckpt["vocab"]), None
    return ckpt, Vocabulary.from_list(ckpt["vocab"]), load_splits(path.parent / "splits.json")


def build_objective(cfg: Config, run_dir: Path, model: CaptionModel, vocab: Vocabulary, datasets: dict,
                    precision: str, device: torch.device, rank: int = 0, state: TrainState | None = None):
    """The loss of train.objective: cross-entropy, or SCST with CIDEr-D's document frequencies of the
    training split (built once into the run directory with the vocabulary's fingerprint; a resumed run
    reads them back and refuses another vocabulary's). SCST's samples are drawn from a generator seeded
    by (seed, rank, step of `state`): each process draws its own, and a resumed run the same again."""
    if cfg.train.objective == "xe":
        return CrossEntropy(precision, device, cfg.train.label_smoothing)
    references = reference_ids(datasets["train"], vocab)      # rare words: ids no sample can have
    path = run_dir / CIDER_FILE
    if path.is_file():
        cider = CiderD.load(path, vocab.fingerprint(), references)
    else:
        cider = CiderD.build(references)
        if rank == 0:
            cider.save(path, vocab.fingerprint())
    s = cfg.scst
    return ScstObjective(model, cider, Rules(vocab.pad, vocab.bos, vocab.eos), s.samples, s.max_words, s.baseline,
                         precision, device, seed=cfg.seed * 1_000_003 + rank,
                         step=(lambda: state.step) if state is not None else None)


def _model(cfg: Config, vocab: Vocabulary, weights: dict | None, device: torch.device) -> CaptionModel:
    """The run's model, with the weights of a checkpoint (resume, train.init_from) when given: loaded before
    anything runs the encoder (the feature cache checks its weights). torchvision's would be downloaded for
    nothing, so a model with weights to load is built without them."""
    model = build_model(replace(cfg.model, pretrained=cfg.model.pretrained and weights is None), len(vocab),
                        vocab.pad)
    if weights is not None:
        model.load_state_dict(weights["model"])
    return model.to(device)


def _start(cfg: Config, run_dir: Path, ckpt: dict | None, progress: bool) -> Run:
    """Build a run's processes, data, model, optimizer and schedule; load `ckpt` (last.pt) when resuming."""
    cfg, given = absolute_paths(cfg)
    given = {**(ckpt or {}).get("paths_given", {}), **given}
    rank, world, local_rank = distributed.init_distributed()
    if world > 1 and cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
                         f"{world} processes")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.train.precision, device)
    vocab = None if ckpt is None else Vocabulary.from_list(ckpt["vocab"])
    init, splits = None, None
    if ckpt is None and cfg.train.init_from:
        init, vocab, splits = read_init(cfg)
    corpus, datasets, vocab = prepare_data(cfg, run_dir, vocab, rank, splits, resume=ckpt is not None)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml", given)
        if not (run_dir / "env.json").is_file():     # the run's start; a resume elsewhere logs its own device
            write_env(run_dir / "env.json", device, precision)
    model = _model(cfg, vocab, ckpt or init, device)
    if init is not None:
        log.info("starting from %s (epoch %s)", cfg.train.init_from, init.get("epoch"))
    if cfg.train.cache_features:
        datasets = _cached(cfg, corpus, datasets, model, device, precision, rank, progress)
    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = len(build_loader(datasets["train"], batch_size=cfg.train.batch_size, shuffle=True,
                                       num_workers=0, rank=rank, world=world))
    state = TrainState()
    run = Run(cfg, run_dir, device, precision, vocab, datasets, model, distributed.wrap(model, device, local_rank),
              optimizer, build_scheduler(cfg, optimizer, steps_per_epoch, state),
              torch.amp.GradScaler(device.type, enabled=precision == "fp16"), state, rank, world, given,
              build_objective(cfg, run_dir, model, vocab, datasets, precision, device, rank, state))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        run.state.load_state_dict(ckpt)
        load_scheduler_state(run.scheduler, ckpt["scheduler"], run.state.step)
        run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])     # last: nothing below draws from the global RNGs before training
    trainable, frozen = count_parameters(model)
    log.info("%d train / %d val images, %d words, %.1f M trainable + %.1f M frozen parameters, %s on %s",
             len(datasets["train"]), len(datasets["val"]), len(vocab), trainable / 1e6, frozen / 1e6, precision, device)
    return run


def _epoch(run: Run, progress: bool) -> str:
    """Train one epoch (or the rest of one), validate, checkpoint; returns the epoch's line for the log."""
    cfg, state, t = run.cfg, run.state, run.cfg.train
    epoch, start = state.epoch + 1, time.time()
    train_loader = run.loader("train", epoch, skip_batches=state.batch)
    lr = cfg.train.lr * run.scheduler.lr_lambdas[0](state.step - state.batch)   # at the epoch's first step

    end = state.batch + len(train_loader)

    def on_step() -> None:                  # the checkpoint at the epoch's end is written below, after validation
        if t.save_every and state.step % t.save_every == 0 and state.batch < end:
            run.save_last()

    train_stats = train_one_epoch(run.net, train_loader, run.optimizer, run.scheduler, run.scaler, state,
                                  precision=run.precision, device=run.device, grad_clip=t.grad_clip,
                                  progress=progress, on_step=on_step, objective=run.objective)
    sums = [state.sums.get(k, 0) for k in ("reward", "baseline", "samples")]     # over all processes' samples
    val_loss = evaluate_loss(run.model, run.loader("val"), run.precision, run.device)["loss"]
    cider = None
    if t.monitor == "cider" and (epoch % t.eval_every == 0 or epoch == t.epochs):
        # rank 0's, shared: every process must take the same decisions (best, early stop, plateau)
        cider = val_cider(run.model, run.datasets["val"], run.vocab, cfg, run.precision, run.device) \
            if run.rank == 0 else 0.0
        cider = distributed.all_sum(cider)[0]
    mean = (lambda i: round(sums[i] / sums[2], 5) if sums[2] else "")     # noqa: E731 (scst's rewards)
    state.end_epoch({"epoch": epoch, "train_loss": round(train_stats["loss"], 5), "val_loss": round(val_loss, 5),
                     "val_cider": "" if cider is None else round(cider, 5), "reward": mean(0), "baseline": mean(1),
                     "lr": lr, "seconds": round(time.time() - start, 2)})
    value = val_loss if t.monitor == "val_loss" else cider
    improved = state.record(value, lower_is_better=t.monitor == "val_loss")
    if t.scheduler == "plateau" and value is not None and not improved:
        _drop_lr(run)
    if run.rank == 0:
        write_history(state.history, run.run_dir)
        if improved:
            save_atomic(model_checkpoint(run.model, cfg, run.vocab, epoch=epoch, val_loss=val_loss, val_cider=cider,
                                         paths_given=run.paths_given), run.run_dir / "best.pt")
    run.save_last()
    reward = f"reward {state.history[-1]['reward']:.3f}  " if sums[2] else ""
    return (f"epoch {epoch}: train {train_stats['loss']:.4f}  val {val_loss:.4f}  "
            f"{'' if cider is None else f'CIDEr {cider:.3f}  '}{reward}lr {lr:.2e}  "
            f"{state.history[-1]['seconds']:.0f}s{'  *best' if improved else ''}")


def _drop_lr(run: Run) -> None:
    """scheduler=plateau: one more factor gamma, from the next step on."""
    run.state.lr_drops += 1
    factor = run.scheduler.lr_lambdas[0](run.state.step)
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base * factor


def _fit(run: Run, progress: bool) -> Path:
    progress = progress and run.rank == 0
    while not run.state.finished(run.cfg):
        line = _epoch(run, progress)
        if run.rank == 0:
            (tqdm.write if progress else log.info)(line)
    distributed.barrier()              # the files are written before any process returns
    return run.run_dir


# ---------------------------------------------------------------- entry points

def train(cfg: Config, progress: bool = True) -> Path:
    """Train a new run in cfg.run_dir; returns the run directory."""
    run_dir = Path(cfg.run_dir)
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a run: continue it with --resume {run_dir} (or "
                              "--resume auto), or choose another run_dir")
    return _fit(_start(cfg, run_dir, None, progress), progress)


def resume(run_dir: str | Path, overrides: list[str] = (), progress: bool = True) -> Path:
    """Continue the run in `run_dir` from its last.pt, e.g. with overrides ["train.epochs=40"] to go on longer.

    A run that already finished (all epochs, or stopped early) returns at once, saying so.
    """
    return _resume(run_dir, overrides, progress)


def _resume(run_dir: str | Path, overrides: list[str], progress: bool) -> Path:
    run_dir = Path(run_dir)
    ckpt = read_checkpoint(run_dir / "last.pt")
    _check_resume_overrides(overrides, run_dir)
    cfg = from_dict(ckpt["config"], [*overrides, f"run_dir={run_dir}"], source=str(run_dir / "last.pt"))
    state = TrainState()
    state.load_state_dict(ckpt)
    if state.finished(cfg):
        log.info("%s finished at epoch %d of %d; to train longer: --resume %s --set train.epochs=%d",
                 run_dir, state.epoch, cfg.train.epochs, run_dir, cfg.train.epochs + 10)
        return run_dir
    return _fit(_start(cfg, run_dir, ckpt, progress), progress)


# what --set may change when a run goes on: the rest (sizes, schedule, optimizer, data preparation)
# would silently not apply, or change the run's past (the schedule is a function of the step)
RESUME_KEYS = ("run_dir", "train.epochs", "train.patience", "train.save_every", "train.num_workers", "train.device",
               "train.precision", "train.eval_every", "train.eval_images", "train.grad_clip", "data.images",
               "data.captions", "data.features_dir")


def _check_resume_overrides(overrides: list[str], run_dir: Path) -> None:
    fixed = [item.partition("=")[0].strip() for item in overrides
             if item.partition("=")[0].strip() not in RESUME_KEYS]
    if fixed:
        raise ConfigError(f"--set {', '.join(fixed)}: a resumed run keeps these from {run_dir}/config.yaml (its "
                          "optimizer, schedule and data are already under way); it can change "
                          f"{', '.join(RESUME_KEYS)}. Start a new run (another run_dir) to change the rest")


def train_or_resume(cfg: Config, overrides: list[str] = (), progress: bool = True) -> Path:
    """`--resume auto`: continue the run in cfg.run_dir when it holds a last.pt, else start it.

    A run that goes on keeps the config saved in it, plus those of `overrides` a resumed run can
    take (RESUME_KEYS: the same job script, with its --set, serves the start and every restart); keys
    of `cfg` that differ from the saved config are named in a warning.
    """
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "last.pt").is_file():
        return train(cfg, progress)
    overrides = [item for item in overrides if item.partition("=")[0].strip() in RESUME_KEYS]
    if (run_dir / "config.yaml").is_file():
        saved = absolute_paths(from_dict(read_yaml_config(run_dir / "config.yaml"), overrides, check_paths=False))[0]
        changed = _differences(saved, absolute_paths(cfg)[0])
        if changed:
            log.warning("%s continues with the config saved in it; these keys of the config given differ and are "
                        "not used: %s (--set changes a key of the run)", run_dir, ", ".join(changed))
    return resume(run_dir, overrides, progress)


def _differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return sorted(k for k in fa if fa[k] != fb.get(k))


def fit(cfg: Config | None, resume: str | Path | None = None, overrides: list[str] = (),
        progress: bool = True) -> Path:
    """The entry point of earlier versions: train(cfg), or resume(resume, overrides) when `resume` is given."""
    return train(cfg, progress) if resume is None else _resume(resume, overrides, progress)


