"""torchrun: two CPU processes (gloo) train what one process trains at the same global batch."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from captioning import load_checkpoint
from captioning.config import save_config
from captioning.data.corpus import load_splits
from captioning.model.caption_model import build_model
from captioning.model.checkpoint import read_checkpoint
from conftest import tiny_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, read from /proc (before anything is killed: orphans move to init)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(parents.get(found[-1], []))
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """`process` and every process under it, at once (SIGKILL): torchrun starts its workers in sessions of
    their own, so killing torchrun alone, or its process group, would leave them running. A process that has
    ended is left alone (its id may be another's by now; torchrun ends only once its workers have)."""
    if process.poll() is not None:
        return
    for pid in process_tree(process.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def torchrun(*args, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run ARGS`, its output captured (in files: a full pipe could block it);
    whatever happens (a hang past `timeout` raises TimeoutExpired), no process of it outlives the call."""
    command = [sys.executable, "-m", "torch.distributed.run", *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        finally:
            kill_tree(process)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, code, out.read(), err.read())


def test_two_processes_train_what_one_process_trains(shapes_dir, tmp_path):
    # a frozen backbone (BatchNorm statistics are per process) and no dropout (each process has its RNG);
    # 8 images a step, split 4 + 4
    settings = ("model.train_backbone=false", "model.dropout=0.0", "train.batch_size=8", "train.epochs=2")
    for name in ("one", "two"):
        save_config(tiny_config(shapes_dir, tmp_path / name, *settings), tmp_path / f"{name}.yaml")
    one = subprocess.run([sys.executable, "-m", "captioning", "train", "--config", tmp_path / "one.yaml"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "captioning", "train", "--config",
                   tmp_path / "two.yaml")
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = read_checkpoint(tmp_path / "one" / "last.pt"), read_checkpoint(tmp_path / "two" / "last.pt")
    assert a["step"] == b["step"] > 0
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in a["history"]] == pytest.approx([h[key] for h in b["history"]], rel=1e-4)
    # the same global batches and the same token-mean loss: the same updates, up to float summation order.
    # Adam turns those last-bit differences into full-size steps on near-zero gradients, so compare the
    # whole update: the two runs moved the weights the same way to within 1% of how far they moved
    torch.manual_seed(0)
    vocab_size = a["model"]["head.bias"].numel()
    initial = build_model(tiny_config(shapes_dir, tmp_path, *settings).model, vocab_size).state_dict()
    moved = [(a["model"][k] - initial[k], b["model"][k] - initial[k]) for k in a["model"] if k in initial]
    difference = sum(((da - db) ** 2).sum() for da, db in moved).sqrt()
    total = sum((da ** 2).sum() for da, _ in moved).sqrt()
    assert total > 0.1 and difference / total < 0.01, (difference / total).item()
    # rank 0 wrote the run directory; its checkpoint is a plain single-process one
    assert load_splits(tmp_path / "one" / "splits.json") == load_splits(tmp_path / "two" / "splits.json")
    assert not any(k.startswith("module.") for k in b["model"])
    model, _, _ = load_checkpoint(tmp_path / "two" / "best.pt")
    assert model.head.out_features > 0


def test_two_processes_train_scst(shapes_dir, tiny_run, tmp_path):
    """SCST under torchrun: each process samples and rewards its share of the images, the loss is averaged
    over both, and rank 0 writes the run with the reward's document frequencies and the mean rewards."""
    settings = ("train.objective=scst", "train.monitor=cider", f"train.init_from={tiny_run / 'best.pt'}",
                "scst.samples=3", "scst.max_words=8", "train.batch_size=8", "train.epochs=1")
    save_config(tiny_config(shapes_dir, tmp_path / "scst", *settings), tmp_path / "scst.yaml")
    two = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "captioning", "train", "--config",
                   tmp_path / "scst.yaml")
    assert two.returncode == 0, two.stderr[-3000:]
    ckpt = read_checkpoint(tmp_path / "scst" / "last.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    row = ckpt["history"][0]
    assert row["reward"] != "" and row["val_cider"] != ""
    assert (tmp_path / "scst" / "cider_df.json").is_file()


def test_a_held_run_directory_stops_every_process_before_training(shapes_dir, tmp_path):
    """Only rank 0 takes the lock; when it cannot, no process trains and torchrun exits non-zero."""
    from test_second_week import held
    save_config(tiny_config(shapes_dir, tmp_path / "run", "train.epochs=1"), tmp_path / "c.yaml")
    (tmp_path / "run").mkdir()
    holder = held(tmp_path / "run", "run directory")
    try:
        two = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "captioning", "train",
                       "--config", tmp_path / "c.yaml", timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert two.returncode != 0 and f"process {holder.pid}" in two.stderr, two.stderr[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists() and "epoch 1" not in two.stderr
