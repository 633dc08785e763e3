"""DataLoader workers do not grow in memory over an epoch.

A forked worker shares the parent's pages until it writes to one. Python writes to an object when it
merely reads it (its reference count) and when the garbage collector walks it, so a dataset held as
Python lists of Python objects (one tensor per caption, one str per name) is copied into every worker
page by page as the epoch visits each image: with Flickr30k's 159k captions, tens of MB per worker.
CaptionDataset keeps its captions, references and names in a few flat numpy arrays instead.

Measured: each worker's private memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup)
after the first batch and at the last one, over an epoch of 150,000 captions with 2 forked workers.
Images are a tiny constant (data.open_image patched), so the epoch takes seconds.
"""
import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.data import dataset as data
from captioning.data.corpus import Corpus
from captioning.data.dataset import CaptionDataset, build_loader
from captioning.data.vocab import Vocabulary

IMAGES, CAPTIONS, WORDS = 30_000, 5, 12
MAX_GROWTH_MB = 8       # per worker over the epoch; lists of tensors grow by tens of MB


def uss_mb(pid: int) -> float:
    """Private (unshared) memory of a process: what it has copied from its parent or allocated itself."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])     # kB
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def corpus_of(n_images: int) -> Corpus:
    rng = random.Random(0)
    words = [f"word{i}" for i in range(2000)]
    captions = {f"{i // 1000:02d}/{i:06d}.jpg": [" ".join(rng.choices(words, k=WORDS)) for _ in range(CAPTIONS)]
                for i in range(n_images)}
    return Corpus(Path("/nonexistent"), captions)


def worker_growth(dataset, batch_size: int = 64) -> list[tuple[float, float]]:
    """(USS after the first batch, USS at the last batch) in MB of each of the 2 workers, over one epoch."""
    loader = build_loader(dataset, batch_size=batch_size, shuffle=True, num_workers=2, seed=0)
    sizes, pids = {}, []
    for k, _ in enumerate(loader):
        if k == 0:
            pids = [p.pid for p in multiprocessing.active_children() if p.is_alive()]
            sizes = {pid: [uss_mb(pid)] for pid in pids}
        elif k == len(loader) - 1:
            for pid in pids:
                sizes[pid].append(uss_mb(pid))
    assert len(pids) == 2, f"expected 2 DataLoader workers, found processes {pids}"
    return [tuple(v) for v in sizes.values()]


def measure() -> list[tuple[float, float]]:
    """The epoch of the test, in this process: each worker's (USS after the first batch, at the last)."""
    tiny = Image.new("RGB", (8, 8), (120, 60, 30))
    data.open_image = lambda path: tiny
    corpus = corpus_of(IMAGES)
    vocab = Vocabulary.build((c for cs in corpus.captions.values() for c in cs), min_freq=1)
    dataset = CaptionDataset(corpus, sorted(corpus.captions), vocab, image_size=8, max_words=20)
    del corpus          # as in training: the datasets are what the workers inherit
    assert sum(len(c) for c in dataset.captions) == IMAGES * CAPTIONS
    return worker_growth(dataset)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork" or not Path("/proc/self/smaps_rollup").exists(),
                    reason="measures forked workers through Linux's /proc/PID/smaps_rollup")
def test_workers_do_not_copy_the_dataset_over_an_epoch():
    # in a process of its own, as training runs: forked from pytest's, after hundreds of other tests, a worker
    # also copies pages of whatever those left behind (in a full run: 23 -> 31 MB, against 15 -> 16 alone)
    out = subprocess.run([sys.executable, "-c", "import json, test_loader_memory as t; print(json.dumps(t.measure()))"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                                        os.environ.get("PYTHONPATH")]))})
    assert out.returncode == 0, out.stderr[-2000:]
    growth = json.loads(out.stdout.splitlines()[-1])
    print("worker USS MB (first batch -> last batch):", ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in growth))
    assert all(end - start < MAX_GROWTH_MB for start, end in growth), \
        f"a DataLoader worker grew by more than {MAX_GROWTH_MB} MB over one epoch: {growth}"


def test_the_packed_dataset_reads_like_the_lists_it_replaces():
    captions = {"café/0.jpg": ["Ein Hund läuft .", "a dog"], "b.jpg": ["two cats"], "ß.png": ["", "x y z w"]}
    vocab = Vocabulary.build([c for cs in captions.values() for c in cs], min_freq=1)
    dataset = CaptionDataset(Corpus(Path("/nonexistent"), captions), list(captions), vocab, image_size=8, max_words=3)
    assert list(dataset.names) == list(captions) and dataset.names[-1] == "ß.png" and len(dataset.names) == 3
    assert dataset.names[1:] == ["b.jpg", "ß.png"] and "b.jpg" in dataset.names and dataset.names.index("ß.png") == 2
    assert list(dataset.references) == list(captions.values()) and dataset.references[-1] == ["", "x y z w"]
    for refs, ids in zip(captions.values(), dataset.captions):
        assert [t.tolist() for t in ids] == [vocab.encode(c, 3) for c in refs]
        assert all(t.dtype == torch.long and t.dim() == 1 for t in ids)
    with pytest.raises(IndexError):
        dataset.names[3]
    with pytest.raises(IndexError):
        dataset.captions[-4]
