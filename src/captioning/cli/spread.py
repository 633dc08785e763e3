"""`caption --out FILE` across processes: `torchrun --nproc_per_node=N -m captioning caption --out
preds.jsonl INPUTS`.

    split   every rank expands the inputs the same way (sorted, as one process does) and takes
            input i when i % N is its rank: no message passes between ranks
    parts   rank K appends its results to FILE.parts/rank-K-of-N.EXT through ResultsFile, so its
            part goes on after a kill -9 as a one-process --out file does; it skips what its own
            part, the other parts (of any N) or FILE itself already hold
    marks   FILE.parts/rank-K-of-N.alive: a lock rank K holds while it runs (the system drops it
            when the process dies, kill -9 included); .done when its part is finished; .failed,
            with its error, when it stopped on one
    merge   rank 0, its own part done, waits for the others' .done (a .failed, or a rank whose
            lock went free with no .done, ends the job with a line naming that rank), then writes
            FILE whole (write_atomic) from FILE and every part: the rows of earlier runs first,
            then one row per input of this run, in input order; then removes FILE.parts

Ranks read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE, which torchrun sets: no process
group, so a rank captioning from an export never imports torch (only the launcher does). A run
that stops anywhere (a rank killed, the whole job killed, the merge cut short) is continued by the
same command, with any N, or without torchrun: every input ends up in FILE exactly once.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import EnvironmentProblem
from ..data.images import redact
from ..files import hold, write_atomic
from .inputs import Shard
from .results import read_rows, write_rows

GRACE_S = 120.0   # how long rank 0 waits for a rank it has never seen running to show up
# A .failed mark older than this process (less a margin for the clocks of several nodes) is an
# earlier job's: the rank that left it removes it when it starts again, maybe after rank 0 looked.
STARTED = time.time()
STALE_MARGIN_S = 5.0
POLL_S = 0.25


class RankFailed(EnvironmentProblem):
    """A rank that failed or died: the job ends with this line, naming it."""


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> Rank:
        """This process's place in the job, from the variables torchrun sets (alone: 0 of 1)."""
        env = os.environ
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} with WORLD_SIZE={world}: expected 0 <= RANK < "
                             "WORLD_SIZE (torchrun sets both)")
        return cls(rank, world, int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", str(world))))

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def share(self, inputs: list) -> list:
        """This rank's inputs: every world-th, from its rank on (the same on every rank)."""
        return inputs[self.rank::self.world]

    def threads(self) -> int:
        """Intra-op threads on CPU: this node's cores shared by its ranks (one each when N =
        cores)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) // max(self.local_world, 1))


def parts_folder(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_file(out: Path, rank: Rank) -> Path:
    return parts_folder(out) / f"rank-{rank.rank}-of-{rank.world}{out.suffix}"


def _mark(out: Path, rank: int, world: int, kind: str) -> Path:
    return parts_folder(out) / f"rank-{rank}-of-{world}.{kind}"


def job_digest(inputs: list[str], model: str, flags: tuple) -> str:
    """What a .done mark is for: this run's inputs, model and --retry-errors/--redo (a mark left by
    a run of other inputs is not taken for this one's)."""
    text = json.dumps([inputs, model, list(flags)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def running(out: Path, rank: Rank):
    """Rank `rank`'s life: its stale marks removed, its .alive lock held (with its pid) until the
    block ends; an error in the block leaves a .failed mark for rank 0 to name."""
    folder = parts_folder(out)
    folder.mkdir(exist_ok=True)
    for kind in ("done", "failed"):
        _mark(out, rank.rank, rank.world, kind).unlink(missing_ok=True)
    fd = os.open(_mark(out, rank.rank, rank.world, "alive"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # blocking: rank 0's look at it takes a moment only
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        except Exception as e:
            _write_json(_mark(out, rank.rank, rank.world, "failed"), {"error": str(e)})
            raise
    finally:
        os.close(fd)


def mark_done(out: Path, rank: Rank, digest: str, rows: int) -> None:
    """Rank `rank`'s part is finished (written inside `running`, before its lock goes)."""
    _write_json(_mark(out, rank.rank, rank.world, "done"), {"job": digest, "rows": rows})


def _write_json(path: Path, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj) + "\n"), "w")


def _read_json(path: Path, since: float | None = None) -> dict | None:
    """The mark's JSON; None when it is missing, unreadable, or older than `since` (a timestamp)."""
    try:
        if since is not None and path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(path: Path) -> bool:
    """Whether a process holds the .alive lock `path` (taken and given back at once if not)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_for_ranks(out: Path, rank: Rank, digest: str, grace_s: float | None = None) -> None:
    """Rank 0: return once every other rank has marked its part done; a rank that failed or died
    raises RankFailed naming it (its rows are kept: the same command goes on)."""
    if grace_s is None:
        grace_s = float(os.environ.get("CAPTIONING_RANK_GRACE_S", GRACE_S))
    again = f"the rows written are kept: run the same command again to go on (any N) from {out}"
    pending = set(range(rank.world)) - {rank.rank}
    seen, start = set(), time.monotonic()
    while pending:
        for other in sorted(pending):
            alive = _alive(_mark(out, other, rank.world, "alive"))
            done = _read_json(_mark(out, other, rank.world, "done"))
            if done is not None and done.get("job") == digest:
                pending.discard(other)
                continue
            failed = _read_json(_mark(out, other, rank.world, "failed"),
                                since=STARTED - STALE_MARGIN_S)
            if failed is not None:
                raise RankFailed(f"rank {other} of {rank.world} failed: {failed.get('error')}; "
                                 f"{again}")
            if alive:
                seen.add(other)
            elif other in seen:
                raise RankFailed(f"rank {other} of {rank.world} died before finishing its part "
                                 f"(killed?); {again}")
            elif time.monotonic() - start > grace_s:
                raise RankFailed(f"rank {other} of {rank.world} did not start (or died at once) "
                                 f"within {grace_s:g} s; {again}")
        if pending:
            time.sleep(POLL_S)


def _part_files(out: Path) -> list[Path]:
    """Every part in FILE.parts, of any N, oldest first."""
    folder = parts_folder(out)
    found = folder.glob(f"rank-*-of-*{out.suffix}") if folder.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def done_elsewhere(out: Path, mine: Path, model: str, retry_errors: bool, redo: bool) -> set[str]:
    """The inputs FILE or a part other than `mine` already holds (a failed one too, unless
    `retry_errors`); rows of another model: an error, or with `redo` not done."""
    done, others = set(), {}
    for path in [out] + [p for p in _part_files(out) if p != mine]:
        for row in read_rows(path):
            made_by = row.get("model") or ""
            if made_by and made_by != model:
                others.setdefault(made_by, path)
                continue
            if not row.get("error") or not retry_errors:
                done.add(row["input"])
    if others and not redo:
        where = ", ".join(sorted({str(p) for p in others.values()}))
        raise ValueError(f"{where}: row(s) made by another model ({', '.join(sorted(others))}), "
                         f"not this run's {model}: give --out a new file, or add --redo to caption "
                         "those inputs again with this model")
    return done


def _shard_file(out: Path, shard: str) -> Path:
    return parts_folder(out) / f"shard-{hashlib.sha256(shard.encode()).hexdigest()[:16]}.json"


def record_shard(out: Path, shard: str, names: list[str]) -> None:
    """A shard read to its end: its samples' names in shard order, for the merge."""
    _write_json(_shard_file(out, shard),
                {"shard": redact(shard), "names": [redact(name) for name in names]})


def _names(out: Path, inputs: list[str]) -> list[str]:
    """The row names of this run's inputs, in order: a shard's samples as its reader found them."""
    names = []
    for item in inputs:
        if not isinstance(item, Shard):
            names.append(redact(item))
            continue
        found = _read_json(_shard_file(out, item))
        if found is None:
            raise RankFailed(f"the shard {redact(item)} was not read to its end by any rank: run "
                             "the same command again")
        names.extend(found["names"])
    return names


def merge(out: Path, inputs: list[str], model: str) -> list[dict]:
    """Rank 0, every part done: FILE rewritten whole from FILE and the parts (the rows of inputs
    not in this run first, as they were; then one row per input of this run, in order), then
    FILE.parts removed. Returns this run's rows."""
    inputs = _names(out, inputs)
    with hold(out, "results file"):
        sources = [read_rows(out)] + [read_rows(p) for p in _part_files(out)]
        best, order = {}, {}
        for seq, row in enumerate(row for rows in sources for row in rows):
            name = row["input"]
            order.setdefault(name, seq)
            key = ((row.get("model") or model) == model, not row.get("error"), seq)
            if name not in best or key > best[name][0]:
                best[name] = (key, row)
        this_run = set(inputs)
        missing = [name for name in inputs if name not in best]
        if missing:
            raise RankFailed(f"{len(missing)} input(s) have no row in {out} or its parts (the "
                             f"first: {missing[0]}): run the same command again")
        earlier = sorted((name for name in best if name not in this_run), key=order.get)
        rows = [best[name][1] for name in inputs]
        write_rows(out, [best[name][1] for name in earlier] + rows)
        shutil.rmtree(parts_folder(out), ignore_errors=True)
    return rows
