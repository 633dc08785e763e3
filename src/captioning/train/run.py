"""A training run: its directory, data, model, objective, epochs with early stopping, exact resume.

    train(cfg)                      a new run in cfg.run_dir
    resume(run_dir, overrides)      continue a run from its last.pt (bit-exact after a kill)
    train_or_resume(cfg)            --resume auto: continue the run in cfg.run_dir, or start it

best.pt follows the monitored value (validation cross-entropy, the reference's choice, or validation
CIDEr with `train.monitor=cider`); checkpoints, history.csv and plots are written as the run goes,
and only rank 0 writes files, from the unwrapped model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import (
    Config,
    ConfigError,
    absolute_paths,
    flatten,
    from_dict,
    read_yaml_config,
    save_config,
    to_dict,
    validate,
)
from ..data.check import summary_line
from ..data.corpus import load_splits, make_splits, read_corpus, save_splits
from ..data.dataset import CaptionDataset
from ..data.stream import ShardSplit, any_loader, prepare_stream
from ..data.vocab import Vocabulary
from ..device import resolve_device, resolve_precision
from ..env import write_env
from ..model.caption_model import CaptionModel, count_parameters
from ..model.checkpoint import (
    model_checkpoint,
    read_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from . import distributed
from .feature_cache import FeatureDataset
from .feature_shards import feature_streams
from .features import extract_features
from .init_from import build_run_model, read_init
from .loop import (
    TrainState,
    build_objective,
    build_optimizer,
    build_scheduler,
    evaluate_loss,
    load_scheduler_state,
    seed_everything,
    train_one_epoch,
    val_cider,
    write_history,
)
from .tensorboard import TensorBoardLog, open_log, require_log

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- a run

@dataclass(kw_only=True)
class Run:
    """Everything one training process holds for a run."""
    cfg: Config
    run_dir: Path
    device: torch.device
    precision: str
    vocab: Vocabulary
    datasets: dict
    model: CaptionModel
    net: torch.nn.Module            # the model as the training steps call it (DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: TrainState
    rank: int = 0
    world: int = 1
    paths_given: dict = field(default_factory=dict)  # config paths as given (not made absolute)
    objective: object = None        # (net, batch) -> (loss, n, sums): CrossEntropy, ScstObjective
    log: TensorBoardLog | None = None   # train.log: tensorboard (rank 0)

    def loader(self, split: str, epoch: int = 0, skip_batches: int = 0):
        t, workers = self.cfg.train, self.cfg.train.num_workers
        if split == "train" and isinstance(self.datasets[split], ShardSplit):
            # a stream's order depends on its readers: an epoch under way goes on with its own
            workers = self.state.readers if skip_batches and self.state.readers else workers
            self.state.readers = max(1, workers)
        return any_loader(self.datasets[split], batch_size=t.batch_size, shuffle=split == "train",
                          num_workers=workers, seed=self.cfg.seed, epoch=epoch,
                          pad_id=self.vocab.pad, skip_batches=skip_batches, rank=self.rank,
                          world=self.world)

    def save_last(self) -> None:
        """last.pt: everything to go on from here."""
        if self.rank == 0:
            save_atomic(model_checkpoint(
                self.model, self.cfg, self.vocab, **self.state.state_dict(),
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(), rng=rng_state(), paths_given=self.paths_given),
                self.run_dir / "last.pt")


def prepare_data(cfg: Config, run_dir: Path, vocab: Vocabulary | None, rank: int = 0,
                 splits: dict | None = None, resume: bool | None = None):
    """Corpus, train/val datasets and vocabulary of a run: made fresh, read back on resume (from the
    run directory), or from the checkpoint a run starts from (`vocab` and its `splits` given)."""
    resume = vocab is not None and splits is None if resume is None else resume
    if cfg.data.format == "webdataset":
        return prepare_stream(cfg, run_dir, vocab, rank, resume)
    with distributed.rank_zero_first(rank):    # rank 0 may generate Shapes; the others then read it
        corpus = read_corpus(cfg)
    log.info("%s", summary_line(corpus, cfg))
    run_dir.mkdir(parents=True, exist_ok=True)    # once the data is found: a typo leaves no folder
    if resume:
        splits = load_splits(run_dir / "splits.json")
    splits = splits or make_splits(corpus, cfg)
    _check_split_images(splits, corpus, cfg)
    if vocab is None:                  # from training captions only: val and test words stay unseen
        vocab = Vocabulary.build((c for n in splits["train"] for c in corpus.captions[n]),
                                 cfg.data.min_freq)
    if rank == 0 and not resume:       # all processes make the same seeded splits; one writes
        save_splits(splits, run_dir / "splits.json")
    for split in ("train", "val"):
        if not splits[split]:
            raise ValueError(f"the {split} split is empty: "
                             "check data.val_fraction and the data set size")
    datasets = {s: CaptionDataset(corpus, splits[s], vocab, cfg.data.image_size, cfg.data.max_words)
                for s in ("train", "val")}
    return corpus, datasets, vocab


def _check_split_images(splits: dict, corpus, cfg: Config) -> None:
    unknown = [n for names in splits.values() for n in names if n not in corpus.captions]
    if unknown:
        raise ConfigError(f"{len(unknown)} image(s) of the run's splits (e.g. {unknown[0]}) "
                          f"are not in data.captions={cfg.data.captions}: the splits come from "
                          f"{'train.init_from' if cfg.train.init_from else 'the run'}, "
                          "whose data this run must read")


def _cached(cfg: Config, corpus, datasets: dict, model: CaptionModel, device, precision, rank: int,
            progress: bool):
    """The datasets read from the frozen encoder's feature cache, built first when missing (rank 0
    extracts while the other processes wait, then they find the cache complete); a stream's from
    feature shards (feature_shards.py)."""
    with distributed.rank_zero_first(rank):
        if isinstance(datasets["train"], ShardSplit):
            return feature_streams(cfg, datasets, model.encoder, device=device,
                                   precision=precision, progress=progress and rank == 0)
        cache = extract_features(cfg, sorted(corpus.captions), corpus.images_dir,
                                 cfg.data.features_dir, encoder=model.encoder, device=device,
                                 precision=precision, progress=progress and rank == 0)
    return {s: FeatureDataset(cache, d) for s, d in datasets.items()}


def _start(cfg: Config, run_dir: Path, ckpt: dict | None, progress: bool) -> Run:
    """A run's processes, data, model, optimizer and schedule, from `ckpt` (last.pt) to resume."""
    cfg, given = absolute_paths(cfg)
    require_log(cfg)                   # a missing extra stops the run before any work
    given = {**(ckpt or {}).get("paths_given", {}), **given}
    rank, world, local_rank = distributed.init_distributed()
    if world > 1 and cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} (the global batch) "
                         f"must be divisible by the {world} processes")
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
    corpus, datasets, vocab = prepare_data(cfg, run_dir, vocab, rank, splits,
                                           resume=ckpt is not None)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml", given)
        # env.json is the run's start; a resume elsewhere logs its own device
        if not (run_dir / "env.json").is_file():
            write_env(run_dir / "env.json", device, precision)
    model = build_run_model(cfg, vocab, ckpt or init, device)
    if init is not None:
        log.info("starting from %s (epoch %s)", cfg.train.init_from, init.get("epoch"))
    if cfg.train.cache_features:
        datasets = _cached(cfg, corpus, datasets, model, device, precision, rank, progress)
    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = len(any_loader(datasets["train"], batch_size=cfg.train.batch_size,
                                     shuffle=True, num_workers=0, rank=rank, world=world))
    state = TrainState()
    run = Run(cfg=cfg, run_dir=run_dir, device=device, precision=precision, vocab=vocab,
              datasets=datasets, model=model, net=distributed.wrap(model, device, local_rank),
              optimizer=optimizer,
              scheduler=build_scheduler(cfg, optimizer, steps_per_epoch, state),
              scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"), state=state,
              rank=rank, world=world, paths_given=given,
              objective=build_objective(cfg, run_dir, model, vocab, datasets, precision, device,
                                        rank, state))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        run.state.load_state_dict(ckpt)
        load_scheduler_state(run.scheduler, ckpt["scheduler"], run.state.step)
        run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])     # last: nothing draws from the global RNGs before training
    run.log = open_log(cfg, run_dir, run.state, rank)
    trainable, frozen = count_parameters(model)
    log.info("%d train / %d val images, %d words, %.1f M trainable + %.1f M frozen parameters, "
             "%s on %s", len(datasets["train"]), len(datasets["val"]), len(vocab), trainable / 1e6,
             frozen / 1e6, precision, device)
    return run


def _epoch(run: Run, progress: bool) -> str:
    """Train one epoch (or the rest of one), validate, checkpoint; the epoch's line for the log."""
    cfg, state, t = run.cfg, run.state, run.cfg.train
    epoch, start = state.epoch + 1, time.time()
    train_loader = run.loader("train", epoch, skip_batches=state.batch)
    lr = cfg.train.lr * run.scheduler.lr_lambdas[0](state.step - state.batch)   # epoch's 1st step

    end = state.batch + len(train_loader)

    def on_step() -> None:                  # the epoch's last checkpoint comes after validation
        if run.log is not None:
            run.log.step(state, cfg.train.lr * run.scheduler.lr_lambdas[0](state.step - 1))
        if t.save_every and state.step % t.save_every == 0 and state.batch < end:
            run.save_last()

    train_stats = train_one_epoch(run.net, train_loader, run.optimizer, run.scheduler, run.scaler,
                                  state, precision=run.precision, device=run.device,
                                  grad_clip=t.grad_clip, progress=progress, on_step=on_step,
                                  objective=run.objective)
    sums = [state.sums.get(k, 0) for k in ("reward", "baseline", "samples")]   # all processes\'
    val_loss = evaluate_loss(run.model, run.loader("val"), run.precision, run.device)["loss"]
    cider = None
    if t.monitor == "cider" and (epoch % t.eval_every == 0 or epoch == t.epochs):
        # rank 0's, shared: every process must take the same decisions (best, early stop, plateau)
        cider = (val_cider(run.model, run.datasets["val"], run.vocab, cfg, run.precision,
                           run.device) if run.rank == 0 else 0.0)
        cider = distributed.all_sum(cider)[0]
    mean = (lambda i: round(sums[i] / sums[2], 5) if sums[2] else "")  # noqa: E731 (scst's sums)
    state.end_epoch({"epoch": epoch, "train_loss": round(train_stats["loss"], 5),
                     "val_loss": round(val_loss, 5),
                     "val_cider": "" if cider is None else round(cider, 5), "reward": mean(0),
                     "baseline": mean(1), "lr": lr, "seconds": round(time.time() - start, 2)})
    value = val_loss if t.monitor == "val_loss" else cider
    improved = state.record(value, lower_is_better=t.monitor == "val_loss")
    if t.scheduler == "plateau" and value is not None and not improved:
        _drop_lr(run)
    if run.rank == 0:
        write_history(state.history, run.run_dir)
        if run.log is not None:
            run.log.end_epoch(run)
        if improved:
            save_atomic(model_checkpoint(run.model, cfg, run.vocab, epoch=epoch, val_loss=val_loss,
                                         val_cider=cider, paths_given=run.paths_given),
                        run.run_dir / "best.pt")
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
    if run.log is not None:
        run.log.end_run(run.state)
    distributed.barrier()              # the files are written before any process returns
    return run.run_dir


# ---------------------------------------------------------------- entry points

def train(cfg: Config, progress: bool = True, resume_hint: str | None = None) -> Path:
    """Train a new run in cfg.run_dir; returns the run directory. `resume_hint`: how the caller
    continues a run, for the error when cfg.run_dir holds one (default: the command's flags)."""
    run_dir = Path(cfg.run_dir)
    with distributed.holding(run_dir):
        if (run_dir / "last.pt").exists():
            hint = resume_hint or f"--resume {run_dir} (or --resume auto)"
            raise FileExistsError(f"{run_dir} already holds a run: continue it with {hint}, "
                                  "or choose another run_dir")
        return _fit(_start(cfg, run_dir, None, progress), progress)


def resume(run_dir: str | Path, overrides: list[str] = (), progress: bool = True) -> Path:
    """Continue the run in `run_dir` from its last.pt, e.g. with overrides ["train.epochs=40"].

    A run that already finished (all epochs, or stopped early) returns at once, saying so.
    """
    return _resume(run_dir, overrides, progress)


def _resume(run_dir: str | Path, overrides: list[str], progress: bool) -> Path:
    run_dir = Path(run_dir)
    ckpt = read_checkpoint(run_dir / "last.pt")
    _check_resume_overrides(overrides, run_dir)
    settings = ([*overrides, f"run_dir={run_dir}"], str(run_dir / "last.pt"))
    cfg = from_dict(ckpt["config"], settings[0], check_paths=False, source=settings[1])
    state = TrainState()
    state.load_state_dict(ckpt)
    if state.finished(cfg):        # a finished run needs no data: its folders may be gone
        log.info("%s finished at epoch %d of %d; to train longer: --resume %s "
                 "--set train.epochs=%d", run_dir, state.epoch, cfg.train.epochs, run_dir,
                 cfg.train.epochs + 10)
        return run_dir
    cfg = from_dict(ckpt["config"], settings[0], source=settings[1])
    with distributed.holding(run_dir):
        return _fit(_start(cfg, run_dir, ckpt, progress), progress)


# what --set may change when a run goes on: the rest (sizes, schedule, optimizer, data preparation)
# would silently not apply, or change the run's past (the schedule is a function of the step)
RESUME_KEYS = ("run_dir", "train.epochs", "train.patience", "train.save_every", "train.num_workers",
               "train.device", "train.precision", "train.eval_every", "train.eval_images",
               "train.grad_clip", "train.log", "data.images", "data.captions",
               "data.features_dir", "data.shards")


def _check_resume_overrides(overrides: list[str], run_dir: Path) -> None:
    fixed = [item.partition("=")[0].strip() for item in overrides
             if item.partition("=")[0].strip() not in RESUME_KEYS]
    if fixed:
        raise ConfigError(f"--set {', '.join(fixed)}: a resumed run keeps these from "
                          f"{run_dir}/config.yaml (its optimizer, schedule and data are already "
                          f"under way); it can change {', '.join(RESUME_KEYS)}. "
                          "Start a new run (another run_dir) to change the rest")


def train_or_resume(cfg: Config, overrides: list[str] = (), progress: bool = True) -> Path:
    """`--resume auto`: continue the run in cfg.run_dir when it holds a last.pt, else start it.

    A run that goes on keeps the config saved in it, plus those of `overrides` a resumed run can
    take (RESUME_KEYS: the same job script, with its --set, serves the start and every restart);
    keys of `cfg` that differ from the saved config are named in a warning.
    """
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "last.pt").is_file():
        return train(validate(cfg), progress)     # now the data must be there
    overrides = [item for item in overrides if item.partition("=")[0].strip() in RESUME_KEYS]
    if (run_dir / "config.yaml").is_file():
        saved = absolute_paths(from_dict(read_yaml_config(run_dir / "config.yaml"), overrides,
                                         check_paths=False))[0]
        changed = _differences(saved, absolute_paths(cfg)[0])
        if changed:
            log.warning("%s continues with the config saved in it; these keys of the config given "
                        "differ and are not used: %s (--set changes a key of the run)", run_dir,
                        ", ".join(changed))
    return resume(run_dir, overrides, progress)


def _differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return sorted(k for k in fa if fa[k] != fb.get(k))


def fit(cfg: Config | None, resume: str | Path | None = None, overrides: list[str] = (),
        progress: bool = True) -> Path:
    """The entry point of earlier versions: train(cfg), or resume(resume, overrides) if given."""
    return train(cfg, progress) if resume is None else _resume(resume, overrides, progress)
