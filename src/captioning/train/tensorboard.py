"""`train.log: tensorboard`: a run's event files in its run directory, written as it trains, so that
`tensorboard --logdir runs/` shows and compares every run below runs/ (the studies' runs too).

    train/loss, train/lr             each optimizer step (the loss of that step's batch, per token)
    scst/reward, scst/baseline       each step of an SCST run (the means over its samples)
    epoch/train_loss, val/loss,      each epoch, at its last step (val/cider where it is computed,
    val/cider, epoch/seconds         epoch/reward and epoch/baseline for SCST)
    val/images, val/captions         each epoch: the first few validation images, and a table of
                                     their captions (as the Captioner writes them) and references
    hparams                          when the run ends: the config's scalar keys with the best and
                                     final scores (SummaryWriter.add_hparams)

history.csv and the PNG plots are written as before; this adds to them. A resumed run purges the
events past its last.pt's step, so the curves carry on without a doubled stretch. Only rank 0
writes. The `tensorboard` package is an optional extra: without it, a run asking for it stops at
once with one line saying what to install.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..captioner import Captioner
from ..config import PATH_KEYS, Config, EnvironmentProblem, flatten, to_dict
from ..data.images import ImageLoadError, open_image

SAMPLES = 4       # validation images shown each epoch


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise EnvironmentProblem("train.log: tensorboard needs the tensorboard package, which is "
                                 "not installed: pip install -e '.[tensorboard]' (or pip install "
                                 "tensorboard), or set train.log: none")


class TensorBoardLog:
    """The event writer of one run; `state` (TrainState) is where the run starts or resumes."""

    def __init__(self, run_dir: str | Path, cfg: Config, state, samples: int = SAMPLES):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.samples, self.run_dir = cfg, samples, Path(run_dir)
        # a resumed run: the steps after its last.pt, logged before it stopped, are logged again
        self.writer = SummaryWriter(log_dir=str(run_dir),
                                    purge_step=state.step + 1 if state.step else None)
        self._last = (state.loss_sum, state.tokens, dict(state.sums))   # the epoch's totals so far

    def step(self, state, lr: float) -> None:
        """After an optimizer step: that step's loss (from the epoch's running totals) and LR."""
        loss_sum, tokens, sums = state.loss_sum, state.tokens, dict(state.sums)
        last = (0.0, 0, {}) if state.batch == 1 else self._last
        self._last = (loss_sum, tokens, sums)
        if tokens > last[1]:
            self.writer.add_scalar("train/loss", (loss_sum - last[0]) / (tokens - last[1]),
                                   state.step)
        self.writer.add_scalar("train/lr", lr, state.step)
        samples = sums.get("samples", 0) - last[2].get("samples", 0)
        for key in ("reward", "baseline") if samples else ():
            self.writer.add_scalar(f"scst/{key}", (sums[key] - last[2].get(key, 0)) / samples,
                                   state.step)

    def end_epoch(self, run) -> None:
        """After an epoch of `run` (run.Run): its history row, and captions of validation images."""
        step = run.state.step
        self.epoch(run.state.history[-1], step)
        self.val_samples(run.model, run.datasets["val"], run.vocab, run.precision, run.device, step)
        self.writer.flush()

    def end_run(self, state) -> None:
        self.hparams(state.history, state.step)
        self.writer.close()

    def epoch(self, row: dict, step: int) -> None:
        """history.csv's row of the epoch that ended at optimizer step `step`."""
        tags = {"train_loss": "epoch/train_loss", "val_loss": "val/loss", "val_cider": "val/cider",
                "reward": "epoch/reward", "baseline": "epoch/baseline", "seconds": "epoch/seconds"}
        for key, tag in tags.items():
            if row.get(key) not in (None, ""):
                self.writer.add_scalar(tag, float(row[key]), step)

    def val_samples(self, model, dataset, vocab, precision: str, device, step: int) -> None:
        """The first few validation images and their captions now (greedy, the Captioner's)."""
        n = min(self.samples, len(dataset))
        names = [dataset.names[i] for i in range(n)]
        images_dir = Path(self.cfg.data.images).expanduser()
        captioner = Captioner(model, vocab, self.cfg, device=device, precision=precision)
        rows = ["| image | caption | a reference |", "|---|---|---|"]
        for i, (name, result) in enumerate(zip(names, captioner.caption(
                [images_dir / name for name in names], beam_size=1))):
            caption = result.caption if result.ok else f"(error: {result.error})"
            rows.append(f"| {name} | {caption} | {dataset.references[i][0]} |")
            try:
                image = open_image(images_dir / name)
            except ImageLoadError:
                continue
            size = (self.cfg.data.image_size * 2,) * 2    # small, as the model sees it (x2)
            self.writer.add_image(f"val/images/{i}", np.asarray(image.resize(size)), step,
                                  dataformats="HWC")
        self.writer.add_text("val/captions", "\n".join(rows), step)

    def hparams(self, history: list[dict], step: int) -> None:
        """The config's scalar keys (paths left out) with the run's best and final scores."""
        hparams = {k: v for k, v in flatten(to_dict(self.cfg)).items()
                   if k not in PATH_KEYS and isinstance(v, (bool, int, float, str))}
        scores = {"hparam/epochs": float(len(history))}
        for key, best in (("val_loss", min), ("val_cider", max)):
            values = [float(h[key]) for h in history if h.get(key) not in (None, "")]
            if values:
                scores[f"hparam/best_{key}"] = best(values)
        if history:
            scores["hparam/final_train_loss"] = float(history[-1]["train_loss"])
        # run_name ".": the run's own directory, so the table's row is the run
        self.writer.add_hparams(hparams, scores, run_name=".", global_step=step)


def require_log(cfg: Config) -> None:
    """Before a run does any work: the package its train.log needs is there."""
    if cfg.train.log == "tensorboard":
        require_tensorboard()


def open_log(cfg: Config, run_dir: Path, state, rank: int = 0) -> TensorBoardLog | None:
    """The run's TensorBoardLog when train.log asks for one (rank 0), else None."""
    if cfg.train.log != "tensorboard" or rank != 0:
        return None
    return TensorBoardLog(run_dir, cfg, state)
