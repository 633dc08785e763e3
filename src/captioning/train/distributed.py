"""Several processes, one run: the little DistributedDataParallel needs around the training loop.

Under `torchrun --nproc_per_node=N -m captioning train ...` each process calls
`init_distributed()`; with one process (a plain `python -m captioning train`)
every function here is a no-op, so the training loop reads the same either way.
"""
from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError
from ..files import Locked, hold, remove_temporary

TIMEOUT_ENV = "CAPTIONING_DIST_TIMEOUT_S"


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when torchrun started several
    processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # gloo reduces the CPU tensors (loss sums), NCCL the CUDA ones (DDP's gradients)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                timeout=collective_timeout())
    return ((dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))) if world > 1
            else (0, 1, 0))


def collective_timeout() -> timedelta | None:
    """How long a collective waits for a process that says nothing: $CAPTIONING_DIST_TIMEOUT_S, else
    torch's default (30 min gloo, 10 min NCCL). A process that dies (kill -9, a crash) closes its
    connections and its peers fail at once; this bounds the wait for a node lost without a word
    (power, network). It must exceed the longest work one rank does while the others wait at a
    barrier: rank 0 builds the feature cache and scores validation CIDEr alone."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < math.inf:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected seconds > 0 (how long a collective "
                          "waits for a silent process), or unset for torch's default")
    return timedelta(seconds=seconds)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(*values: float) -> list[float]:
    """Sums over all processes (the values themselves with one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(rank: int):
    """Rank 0 runs the block first while the others wait at a barrier; then they run it.

    For work one process should do for all (building the feature cache): the others find it done.
    """
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def wrap(model: nn.Module, device: torch.device, local_rank: int) -> nn.Module:
    """The model as the training steps call it: DDP-wrapped with several processes, else itself.

    Everything else (checkpoints, validation) uses the unwrapped model.
    """
    if world_size() == 1:
        return model
    return DistributedDataParallel(model,
                                   device_ids=[local_rank] if device.type == "cuda" else None)


@contextlib.contextmanager
def holding(run_dir):
    """One job at a time on a run directory: rank 0 holds its lock (files.hold) for the duration,
    and the other ranks start only once it has it. A kill's half-written checkpoints go."""
    rank, world, _ = init_distributed()
    lock, error = contextlib.ExitStack(), None
    if rank == 0:
        try:
            lock.enter_context(hold(run_dir, "run directory"))
        except Locked as e:
            error = e
    if world > 1 and not all_sum(1.0 if error is None else 0.0)[0] >= world:
        raise error or Locked(f"run directory {run_dir}: rank 0 could not take its lock")
    if error is not None:
        raise error
    with lock:
        if rank == 0:
            for name in ("last.pt", "best.pt"):
                remove_temporary(run_dir, name)
        yield
