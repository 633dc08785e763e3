"""One training step and one epoch: plain functions over a `TrainState`, no trainer framework.

`train_one_epoch` and `evaluate_loss` return dicts of averages; `run.py` composes them with the
optimizer and schedule of `build_optimizer` / `build_scheduler` (by default the reference's Adam +
ExponentialLR per epoch). Everything that changes as a run goes on and must survive a kill (epoch,
step, position in the epoch, running totals, history, best value) is one `TrainState`, saved in
last.pt with the optimizer, scheduler, scaler and RNG states.

Under `torchrun --nproc_per_node=N -m captioning train ...` the same loop runs DDP
(distributed.py): `train.batch_size` stays the global batch (each process takes its share), the
loss is the mean over the global batch's tokens (so N processes take the steps one process would),
and losses are summed across processes.
"""
from __future__ import annotations

import csv
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..captioner import Captioner
from ..config import Config
from ..data.dataset import CaptionDataset, build_loader
from ..data.vocab import Vocabulary
from ..decode.rules import Rules
from ..device import autocast
from ..eval.metrics import score_captions
from ..eval.plots import plot_history
from ..model.caption_model import CaptionModel
from . import distributed
from .reward import CiderD
from .scst import ScstObjective, reference_ids

log = logging.getLogger(__name__)
CIDER_FILE = "cider_df.json"     # objective=scst: CIDEr-D's document frequencies, training split
# val_cider: monitor=cider; reward, baseline: objective=scst (the means over the epoch's samples)
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_cider", "reward", "baseline", "lr",
                  "seconds")


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


def train_one_epoch(net, loader, optimizer, scheduler, scaler, state: TrainState, *,
                    precision: str, device: torch.device, grad_clip: float = 0.0,
                    label_smoothing: float = 0.0, progress: bool = True, on_step=None,
                    objective=None) -> dict:
    """One pass over `loader`, which starts at batch `state.batch` of epoch `state.epoch + 1`.

    `objective(net, batch)` gives each step's loss (default: cross-entropy, `CrossEntropy`;
    scst.py's `ScstObjective` for self-critical training). Every optimizer step advances `state`
    (step, batch, running totals) and the scheduler, then calls `on_step()` (mid-epoch checkpoints).
    """
    objective = objective or CrossEntropy(precision, device, label_smoothing)
    net.train()
    epoch = state.epoch + 1
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for batch in bar:
        loss, n, sums = objective(net, batch.to(device))
        loss, value, n = _global_mean(loss, n)
        if sums and distributed.world_size() > 1:      # all processes keep the same totals
            sums = dict(zip(sums, distributed.all_sum(*sums.values())))
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at epoch {epoch}, batch {state.batch}: "
                                     "stopping without saving. Try a lower train.lr, "
                                     "train.grad_clip, or train.precision=fp32.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]     # this step's rate (the scheduler sets the next)
        scheduler.step()
        state.advance(value * n, n, sums)
        if on_step is not None:
            on_step()
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}")
    return {"loss": state.loss_sum / max(state.tokens, 1), "tokens": state.tokens,
            "steps": len(loader)}


@torch.no_grad()
def evaluate_loss(model, loader, precision, device, progress: bool = False) -> dict:
    model.eval()
    total, n_total = 0.0, 0
    for batch in tqdm(loader, desc="val", disable=not progress, leave=False):
        loss, n = caption_loss(model, batch.to(device), precision, device)
        total, n_total = total + loss.item() * n, n_total + n
    total, n_total = distributed.all_sum(total, n_total)        # each process scored its shard
    return {"loss": total / max(n_total, 1), "tokens": int(n_total)}


def val_cider(model, dataset: CaptionDataset, vocab: Vocabulary, cfg: Config, precision,
              device) -> float:
    """CIDEr-D of the captions (beam train.eval_beam; 1: greedy) of the first train.eval_images val
    images (0 = all), scored at once.

    The captions come from the Captioner's own prediction path, as `evaluate`'s do.
    """
    n = cfg.train.eval_images or len(dataset)
    subset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    loader = build_loader(subset, batch_size=cfg.train.batch_size, shuffle=False,
                          num_workers=cfg.train.num_workers, pad_id=vocab.pad)
    captioner = Captioner(model, vocab, cfg, device=device, precision=precision)
    predictions = {}
    for batch in loader:
        predictions.update(zip(batch.names, captioner.predict(**batch.model_inputs(),
                                                              beam_size=cfg.train.eval_beam)))
    references = {dataset.names[i]: dataset.references[i] for i in subset.indices}
    return score_captions(predictions, references, metrics=("CIDEr",))[0]["CIDEr"]


# ---------------------------------------------------------------- optimizer, schedule, state

def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (the reference's) or AdamW over the trainable parameters, at train.lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for all parameters instead of several per tensor
    return kind(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)


def lr_factor(cfg: Config, steps_per_epoch: int, state: TrainState | None = None):
    """step -> the factor of train.lr for the optimizer step after `step` steps (plateau: and
    `state`'s drops)."""
    t = cfg.train
    total = max(t.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        if t.scheduler == "constant":
            return warm
        if t.scheduler == "plateau":                          # gamma per evaluation not improving
            return warm * t.gamma ** (state.lr_drops if state is not None else 0)
        if t.scheduler == "cosine":
            done = min(max(step - t.warmup_steps, 0) / max(total - t.warmup_steps, 1), 1.0)
            return warm * 0.5 * (1.0 + math.cos(math.pi * done))
        return warm * t.gamma ** (step // steps_per_epoch)      # exponential: gamma once per epoch

    return factor


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    state: TrainState | None = None):
    """The learning rate of every optimizer step: LambdaLR over `lr_factor`, stepped each step.

    The default (train.scheduler=exponential, no warmup) is the reference's ExponentialLR(gamma)
    stepped once per epoch: the factor is gamma ** (epochs done). `plateau` (ReduceLROnPlateau's
    rule, with patience 0) reads its drops from `state`, which last.pt keeps.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch, state))


def load_scheduler_state(scheduler, saved: dict, step: int) -> None:
    """Scheduler state from last.pt; checkpoints from before build_scheduler hold ExponentialLR's,
    per epoch."""
    if "gamma" in saved:                 # ExponentialLR: it counted epochs, LambdaLR counts steps
        saved = ({k: v for k, v in saved.items() if k != "gamma"}
                 | {"last_epoch": step, "_step_count": step + 1})
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
    sums: dict = field(default_factory=dict)   # of epoch + 1 so far: the objective's other sums
    lr_drops: int = 0               # scheduler=plateau: evaluations not improving, each a gamma
    readers: int = 0                # data.format webdataset: the readers epoch + 1 began with
                                    # (its order depends on them; `batch` is its position)

    def advance(self, loss_sum: float, tokens: int, sums: dict | None = None) -> None:
        self.step, self.batch = self.step + 1, self.batch + 1
        self.loss_sum, self.tokens = self.loss_sum + loss_sum, self.tokens + tokens
        for key, value in (sums or {}).items():
            self.sums[key] = self.sums.get(key, 0) + value

    def end_epoch(self, row: dict) -> None:
        (self.epoch, self.batch, self.loss_sum, self.tokens,
         self.sums) = self.epoch + 1, 0, 0.0, 0, {}
        self.history.append(row)

    def record(self, value: float | None, lower_is_better: bool) -> bool:
        """Count a monitored value (None: not evaluated this epoch); True when it is the best so
    far."""
        if value is None:
            return False
        improved = self.best is None or (value < self.best if lower_is_better
                                         else value > self.best)
        self.best, self.bad_epochs = (value, 0) if improved else (self.best, self.bad_epochs + 1)
        return improved

    def finished(self, cfg: Config) -> bool:
        """All epochs trained, or stopped early: train.patience evaluations without improvement."""
        return self.epoch >= cfg.train.epochs or bool(cfg.train.patience
                                                      and self.bad_epochs >= cfg.train.patience)

    def state_dict(self) -> dict:
        # the names last.pt has always used, so older checkpoints resume and newer ones read alike
        return {"epoch": self.epoch, "step": self.step, "batch": self.batch,
                "epoch_totals": [self.loss_sum, self.tokens], "history": self.history,
                "best_val": math.nan if self.best is None else self.best,
                "bad_epochs": self.bad_epochs,
                "epoch_sums": dict(self.sums), "lr_drops": self.lr_drops,
                "stream_readers": self.readers}

    def load_state_dict(self, d: dict) -> None:
        best = d.get("best_val")
        self.epoch, self.step, self.batch = d["epoch"], d["step"], d.get("batch", 0)
        self.loss_sum, self.tokens = (float(x) for x in d.get("epoch_totals", (0.0, 0)))
        self.tokens = int(self.tokens)
        self.history, self.bad_epochs = list(d.get("history", [])), d.get("bad_epochs", 0)
        self.best = None if best is None or not math.isfinite(best) else best
        self.sums, self.lr_drops = dict(d.get("epoch_sums", {})), d.get("lr_drops", 0)
        self.readers = d.get("stream_readers", 0)


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


def build_objective(cfg: Config, run_dir: Path, model: CaptionModel, vocab: Vocabulary,
                    datasets: dict, precision: str, device: torch.device, rank: int = 0,
                    state: TrainState | None = None):
    """The loss of train.objective: cross-entropy, or SCST with CIDEr-D's document frequencies of
    the training split (built once into the run directory with the vocabulary's fingerprint; a
    resumed run reads them back and refuses another vocabulary's). SCST's samples are drawn from a
    generator seeded by (seed, rank, step of `state`): each process draws its own, and a resumed run
    the same again."""
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
    rules = Rules(vocab.pad, vocab.bos, vocab.eos, min_words=1)     # no sample is an empty caption
    return ScstObjective(model, cider, rules, s.samples, s.max_words, s.baseline, precision, device,
                         seed=cfg.seed * 1_000_003 + rank,
                         step=(lambda: state.step) if state is not None else None)
