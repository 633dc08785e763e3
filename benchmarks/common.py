"""What every benchmark shares, so that each script holds only its scenario.

- `parser(doc)`: the script's argparse parser, described by the docstring's first line, with
  `--json PATH` (the figures written there too);
- `machine(device, precision)`: env.json's fields for this run (`captioning.env.collect_env`),
  printed as the `env: {...}` line; `label(env)` names the machine as docs/benchmarks.md does
  (cpu2-avx512bf16);
- `in_turns(jobs, rounds)` and `medians(...)`: the things compared, timed in turns, round after
  round, in one process, so that a load that comes and goes weighs on each alike;
- `finish(name, figures, env, json_path)`: the last line, `NAME: key=value ...` (CONTRIBUTING.md),
  and with --json the same figures, the machine's label and env, the command and the date.

Figures are given as the line shows them (f"{x:.2f}"); the JSON holds them as numbers where they
are. Torch is imported only by `machine`, so that benchmarks/gpu_check.py runs without it.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

VECTOR_UNITS = (("amx", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512", "avx512"),   # best first
                ("avx2", "avx2"))


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its description the docstring's first line, and --json."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="also write the last line's figures, the machine and the command here")
    return p


def machine(device="cpu", precision: str | None = None) -> dict:
    """env.json's fields for a run on `device` at `precision`, printed as the `env: {...}` line."""
    from captioning.env import collect_env

    env = collect_env(device, precision)
    print("env:", json.dumps(env), flush=True)
    return env


def label(env: dict) -> str:
    """The machine's name from env.json: cpu<threads>-<best vector unit> (cpu2-avx512bf16), or
    cuda-<the GPU's name>."""
    if env.get("gpu"):
        return "cuda-" + "-".join(env["gpu"].lower().split())
    flags = env.get("cpu_flags") or {}
    best = next((name for key, name in VECTOR_UNITS if flags.get(key)), None)
    return f"cpu{env.get('threads')}" + (f"-{best}" if best else "")


def in_turns(jobs: Mapping[str, Callable], rounds: int, warmup: int = 1,
             sync: Callable | None = None, prepare: Mapping[str, Callable] | None = None,
             progress: bool = False) -> dict[str, list[float]]:
    """Seconds of each call of each job: every round calls each job once, in turn, for `warmup`
    rounds (not kept) then `rounds`. `sync` (torch.cuda.synchronize) ends each timed call;
    `prepare[name]`, when given, runs untimed before each call of that job, which gets its
    result."""
    times = {name: [] for name in jobs}
    for r in range(warmup + rounds):
        for name, job in jobs.items():
            args = (prepare[name](),) if prepare and name in prepare else ()
            start = time.perf_counter()
            job(*args)
            if sync is not None:
                sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        if progress and r >= warmup:
            done = ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items())
            print(f"round {r - warmup + 1}/{rounds}: {done}", flush=True)
    return times


def medians(jobs: Mapping[str, Callable], rounds: int, **kwargs) -> dict[str, float]:
    """`in_turns`' median seconds of each job."""
    return {name: statistics.median(t) for name, t in in_turns(jobs, rounds, **kwargs).items()}


def peak_rss_mb() -> float:
    """This process's peak RSS so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _number(value):
    """'1.50' -> 1.5, '160' -> 160, anything else (1.5, 'bf16', 'n/a', 'nan') as it is."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value):
        return float(value) if "." in value else int(value)
    return value


def finish(name: str, figures: Mapping[str, object], env: dict | None = None,
           json_path: Path | None = None) -> str:
    """Print the last line, `NAME: key=value ...`; with `json_path`, write it beside as JSON."""
    line = f"{name}: " + " ".join(f"{key}={value}" for key, value in figures.items())
    if json_path is not None:
        record = {"name": name, "figures": {key: _number(value) for key, value in figures.items()},
                  "machine": label(env) if env else None, "env": env,
                  "command": shlex.join(["python", *sys.argv]),
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "line": line}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
    print(line, flush=True)
    return line
