"""Two torchrun "nodes" on loopback (c10d rendezvous, gloo) train what one node's two processes train; a rank
that fails, a node killed or one gone silent ends the job with a line naming a rank, and --resume auto restarts it.

Each node is `python -m torch.distributed.run --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d
--rdzv-endpoint=127.0.0.1:PORT`, as docs/scaling.md gives it for a cluster. Every wait has a timeout, and
every process a test starts is killed (its whole tree: torchrun starts its workers in sessions of their own)
before the test ends, passing or not.
"""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioning.config import save_config
from captioning.model.caption_model import build_model
from captioning.model.checkpoint import read_checkpoint
from conftest import tiny_config
from test_distributed import free_port, kill_tree, process_tree, torchrun

EPOCHS = 6
# a frozen backbone (BatchNorm statistics are per process) and no dropout (each process has its RNG): the two
# layouts then take the same steps; 8 images a step, 4 + 4
SETTINGS = ("model.train_backbone=false", "model.dropout=0.0", "train.batch_size=8", f"train.epochs={EPOCHS}")
JOB_S = 300            # a job that takes longer than this hangs
# a rank that names itself: ours (`error: rank 1 of 2: ...`) or torchrun's summary (`rank : 1 (local_rank: 0)`)
NAMES_A_RANK = re.compile(r"error: rank \d of 2: |^\s*rank\s*: \d \(local_rank", re.M)


def environment(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CAPTIONING_DIST_TIMEOUT_S": "120", **extra}


class Node:
    """One node's torchrun, its output in a file (a pipe could fill and block it)."""

    def __init__(self, log: Path, port: int, job: str, *command, env=None):
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                 "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}",
                 "-m", "captioning", *map(str, command)], stdout=out, stderr=subprocess.STDOUT,
                env=env or environment(), start_new_session=True)

    def wait(self, timeout: float = JOB_S) -> int:
        return self.process.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        return process_tree(self.process.pid)[1:]


@contextlib.contextmanager
def two_nodes(tmp_path: Path, name: str, *command, env=None):
    """Both nodes of a job, started on a free port; killed when the block ends, however it ends."""
    port, nodes = free_port(), []
    try:
        for k in range(2):
            nodes.append(Node(tmp_path / f"{name}-node{k}.log", port, name, *command, env=env))
        yield nodes
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):    # one node's trouble must not spare the other
                kill_tree(node.process)


def run_two_nodes(tmp_path: Path, name: str, *command) -> None:
    with two_nodes(tmp_path, name, *command) as nodes:
        codes = [node.wait() for node in nodes]
        assert codes == [0, 0], "\n".join(node.output[-3000:] for node in nodes)


def run_one_node(tmp_path: Path, *command) -> None:
    """The same job as two processes of one torchrun."""
    result = torchrun("--nproc_per_node=2", f"--master_port={free_port()}", "-m", "captioning", *command,
                      timeout=JOB_S, env=environment())
    assert result.returncode == 0, result.stderr[-3000:]


def max_difference(a: Path, b: Path) -> float:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_same_run(a: Path, b: Path, tolerance: float = 1e-6) -> None:
    """The two run directories hold the same weights (last.pt and best.pt), steps and losses."""
    ca, cb = read_checkpoint(a / "last.pt"), read_checkpoint(b / "last.pt")
    assert ca["epoch"] == cb["epoch"] == EPOCHS and ca["step"] == cb["step"] > 0
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in ca["history"]] == pytest.approx([h[key] for h in cb["history"]], rel=1e-5)
    for name in ("last.pt", "best.pt"):
        difference = max_difference(a / name, b / name)
        print(f"{name}: max abs difference {difference:.3g}")
        assert difference <= tolerance, (name, difference)


@pytest.fixture(scope="module")
def one_node_run(shapes_dir, tmp_path_factory):
    """The reference: `torchrun --nproc_per_node=2` on one node, EPOCHS epochs."""
    folder = tmp_path_factory.mktemp("one_node")
    save_config(tiny_config(shapes_dir, folder / "run", *SETTINGS), folder / "c.yaml")
    run_one_node(folder, "train", "--config", folder / "c.yaml")
    return folder / "run"


# ---------------------------------------------------------------- the rank in the error line (no torchrun)

def cli(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioning", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_an_error_under_torchrun_names_the_rank_once(tmp_path):
    missing = tmp_path / "missing.yaml"
    alone = cli("train", "--config", missing)
    one_of_two = cli("train", "--config", missing, RANK="1", WORLD_SIZE="2", LOCAL_RANK="0")
    assert alone.returncode == one_of_two.returncode == 2
    last = alone.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(missing) in last and "rank" not in last, last
    last = one_of_two.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 of 2: ") and str(missing) in last, last
    # caption across processes names the rank itself: not twice
    caption = cli("caption", "--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "p.jsonl", missing,
                  RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    last = caption.stderr.strip().splitlines()[-1]
    assert caption.returncode != 0 and last.count("rank 1 of 2") == 1, caption.stderr


def test_a_bad_distributed_timeout_is_named(monkeypatch):
    from captioning.config import ConfigError
    from captioning.train.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=TIMEOUT_ENV):
        collective_timeout()
    monkeypatch.setenv(TIMEOUT_ENV, "inf")              # timedelta would overflow: refused as a bad value
    with pytest.raises(ConfigError, match=TIMEOUT_ENV):
        collective_timeout()
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout().total_seconds() == 90
    monkeypatch.delenv(TIMEOUT_ENV)
    assert collective_timeout() is None


# ---------------------------------------------------------------- two nodes

@pytest.mark.slow
def test_two_nodes_train_what_two_processes_of_one_node_train(shapes_dir, one_node_run, tmp_path):
    save_config(tiny_config(shapes_dir, tmp_path / "run", *SETTINGS), tmp_path / "c.yaml")
    run_two_nodes(tmp_path, "nodes", "train", "--config", tmp_path / "c.yaml")
    assert_same_run(tmp_path / "run", one_node_run)
    # the weights moved: the comparison is not of two untrained models
    torch.manual_seed(0)
    last = read_checkpoint(one_node_run / "last.pt")["model"]
    initial = build_model(tiny_config(shapes_dir, tmp_path, *SETTINGS).model, last["head.bias"].numel()).state_dict()
    assert max((last[k] - initial[k]).abs().max().item() for k in initial if k in last) > 1e-3
    assert not any(k.startswith("module.") for k in last)


@pytest.mark.slow
def test_two_nodes_train_from_shards_what_one_node_trains(shapes_dir, tmp_path):
    pytest.importorskip("webdataset")
    save_config(tiny_config(shapes_dir, tmp_path / "unused", "train.epochs=2"), tmp_path / "images.yaml")
    made = cli("shards", "--config", tmp_path / "images.yaml", "--out", tmp_path / "shards", "--shard-size", "6")
    assert made.returncode == 0, made.stderr
    assert len(list((tmp_path / "shards").glob("train-*.tar"))) >= 4        # 2 processes, each its own shards
    stream = ("data.format=webdataset", f"data.shards={tmp_path / 'shards'}", "data.shuffle_buffer=6", *SETTINGS)
    for name in ("nodes", "one"):
        save_config(tiny_config(shapes_dir, tmp_path / name, *stream), tmp_path / f"{name}.yaml")
    run_two_nodes(tmp_path, "shards", "train", "--config", tmp_path / "nodes.yaml")
    run_one_node(tmp_path, "train", "--config", tmp_path / "one.yaml")
    assert_same_run(tmp_path / "nodes", tmp_path / "one")


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_with_a_line_naming_it(shapes_dir, tmp_path):
    """One training image is not an image: the rank that reads it stops with `error: rank K of 2: NAME: ...`,
    the other (its collective's peer gone) with its own line, and both nodes exit non-zero."""
    from captioning.data.corpus import make_splits, read_corpus

    data = Path(shutil.copytree(shapes_dir, tmp_path / "data"))
    cfg = tiny_config(data, tmp_path / "run", *SETTINGS)
    bad = make_splits(read_corpus(cfg), cfg)["train"][0]
    (data / "flickr30k_images" / bad).write_bytes(b"not an image")
    save_config(cfg, tmp_path / "c.yaml")
    with two_nodes(tmp_path, "fails", "train", "--config", tmp_path / "c.yaml") as nodes:
        codes = [node.wait() for node in nodes]
        output = "".join(node.output for node in nodes)
    assert 0 not in codes, output[-3000:]
    assert re.search(rf"^error: rank \d of 2: .*{re.escape(bad)}", output, re.M), output[-3000:]


def wait_for_last_pt(run_dir: Path, node: Node) -> None:
    """Until the run's first last.pt is there (the end of its first epoch), while `node` runs."""
    deadline = time.monotonic() + JOB_S
    while not (run_dir / "last.pt").is_file() and time.monotonic() < deadline and node.process.poll() is None:
        time.sleep(0.05)
    assert (run_dir / "last.pt").is_file(), node.output[-3000:]


@pytest.mark.slow
def test_a_killed_node_ends_the_job_and_the_same_command_with_resume_auto_finishes_it(
        shapes_dir, one_node_run, tmp_path):
    """kill -9 of a whole node (torchrun and its worker) after the first epoch: the other node ends
    within a bound with a line naming a rank; the same two commands, with --resume auto as a job script would
    have from the start, continue from last.pt and end where the unbroken run ended."""
    save_config(tiny_config(shapes_dir, tmp_path / "run", *SETTINGS), tmp_path / "c.yaml")
    command = ("train", "--config", tmp_path / "c.yaml", "--resume", "auto")
    with two_nodes(tmp_path, "killed", *command) as nodes:
        wait_for_last_pt(tmp_path / "run", nodes[1])
        kill_tree(nodes[0].process)
        killed = time.monotonic()
        code = nodes[1].wait(timeout=90)              # raises (and the finally kills it) if it hangs
        ended_s = time.monotonic() - killed
    output = nodes[1].output
    print(f"the surviving node ended {ended_s:.1f} s after the kill, exit status {code}")
    assert code != 0 and NAMES_A_RANK.search(output), output[-3000:]
    stopped = read_checkpoint(tmp_path / "run" / "last.pt")["epoch"]
    assert 1 <= stopped < EPOCHS

    run_two_nodes(tmp_path, "restarted", *command)
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    assert [h["epoch"] for h in ckpt["history"]] == list(range(1, EPOCHS + 1))
    assert_same_run(tmp_path / "run", one_node_run)


@pytest.mark.slow
def test_a_node_gone_silent_ends_the_job_after_the_collective_timeout(shapes_dir, tmp_path):
    """A node that neither answers nor closes its connections (here: its worker stopped with SIGSTOP, as a
    machine lost to the network looks): the other fails once CAPTIONING_DIST_TIMEOUT_S has passed."""
    save_config(tiny_config(shapes_dir, tmp_path / "run", *SETTINGS[:-1], "train.epochs=200"), tmp_path / "c.yaml")
    env = environment(CAPTIONING_DIST_TIMEOUT_S="5")
    with two_nodes(tmp_path, "silent", "train", "--config", tmp_path / "c.yaml", env=env) as nodes:
        wait_for_last_pt(tmp_path / "run", nodes[1])
        workers = nodes[1].workers()
        assert workers, nodes[1].output[-3000:]
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        code = nodes[0].wait(timeout=90)
        output = nodes[0].output
    assert code != 0, output[-3000:]
    assert re.search(r"^error: rank \d of 2: another process of the job stopped answering", output, re.M), \
        output[-3000:]


def test_gloo_s_messages_of_a_lost_peer_are_recognised():
    """Both ways gloo words a peer gone: its transport's read error, and its own timeout (seen in CI)."""
    from captioning.cli.main import _lost_peer

    assert _lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: Connection reset "
                                   "by peer"))
    assert _lost_peer(RuntimeError("Application timeout caused pair closure"))
    assert not _lost_peer(RuntimeError("a.png: not an image")) and not _lost_peer(ValueError("pair closure"))
