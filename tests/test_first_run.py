"""What a new user meets on the first run (issue 28): the numbers a run prints agree with each other."""
import re

import captioning.train.loop as loop
import captioning.train.run as run
from conftest import tiny_config


class Bar:
    """tqdm's stand-in: iterates, and keeps every postfix it was given."""
    shown: list = []
    written: list = []

    def __init__(self, iterable=None, **kw):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kw):
        Bar.shown.append(kw)

    def close(self):
        pass

    @staticmethod
    def write(line):
        Bar.written.append(line)


def test_an_epoch_s_summary_shows_the_learning_rate_its_progress_bar_showed(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "tqdm", Bar)
    monkeypatch.setattr(run, "tqdm", Bar)
    Bar.shown, Bar.written = [], []
    run.fit(tiny_config(shapes_dir, tmp_path / "run", "train.epochs=2", "train.gamma=0.5"), progress=True)
    summaries = [re.search(r"lr (\S+)", line).group(1) for line in Bar.written if line.startswith("epoch")]
    steps = len(Bar.shown) // 2
    bars = [Bar.shown[steps - 1]["lr"], Bar.shown[-1]["lr"]]      # the last step of each epoch
    assert summaries == bars == ["1.00e-03", "5.00e-04"]
