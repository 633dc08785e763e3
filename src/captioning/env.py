"""What a run ran on: package and library versions, the commit, the device, the CPU's vector units.

Timings and scores depend on all of these (bf16 is a speed-up only on CPUs with AVX-512 BF16 or
AMX), so every run writes them beside its results as env.json, which docs/benchmarks.md cites:

    {"captioning": "0.1.0", "git_commit": "8cf2a5b...-dirty", "torch": "2.4.1",
     "torchvision": "0.19.1", "python": "3.11.7", "device": "cuda:0",
     "cpu_flags": {"model": "AMD EPYC", "avx2": true, ...}, "gpu": "NVIDIA H100 80GB HBM3",
     "precision": "bf16", "threads": 16}

Nothing here raises for a missing git, a tarball install or a machine without /proc/cpuinfo: what
cannot be read is None.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

import torch
import torchvision

from .files import write_atomic

CPUINFO = "/proc/cpuinfo"            # a module constant, so that tests can point it at a fake file
GIT_TIMEOUT_S = 5.0
KEYS = ("captioning", "git_commit", "torch", "torchvision", "python", "device", "cpu_flags", "gpu",
        "precision", "threads")


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess | None:
    """`git args` in `cwd`, or None when git is missing, hangs or cannot run there."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(folder: str | Path | None = None) -> str | None:
    """HEAD's hash of the checkout holding `folder` (default: this package's source), with "-dirty"
    appended when tracked files differ from it; None when git is missing or the source is no tracked
    part of a checkout (an installed copy in site-packages, even inside a checkout's .venv).

    When git can say the commit but not whether the tree is clean, the result counts as dirty:
    a figure must not claim a clean commit it may not come from.
    """
    folder = Path(folder if folder is not None else Path(__file__).parent).resolve()
    head = _git(["rev-parse", "--verify", "HEAD"], folder)
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return None
    tracked = _git(["ls-files", "--error-unmatch", "--", "."], folder)  # folder has tracked files
    if tracked is None or tracked.returncode != 0:
        return None
    commit = head.stdout.strip()
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    clean = status is not None and status.returncode == 0 and not status.stdout.strip()
    return commit if clean else f"{commit}-dirty"


def cpu_flags(path: str | Path | None = None) -> dict:
    """The CPU's model name and whether it has AVX2, AVX-512 (avx512f), AVX-512 BF16 and AMX, from
    /proc/cpuinfo; each flag is None where that file cannot be read (macOS, Windows)."""
    try:
        text = Path(path if path is not None else CPUINFO).read_text(errors="replace")
    except OSError:
        return {"model": platform.processor() or platform.machine() or None,
                "avx2": None, "avx512": None, "avx512_bf16": None, "amx": None}
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model", "hardware"):
            model = value.strip() or None
        elif flags is None and key in ("flags", "features"):   # x86 says flags, Arm Features
            flags = set(value.split())
        if model is not None and flags is not None:
            break                                            # every core repeats the same lines
    flags = flags or set()
    return {"model": model or platform.processor() or platform.machine() or None,
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": bool(flags & {"amx_bf16", "amx_tile"})}


def _gpu_name(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError, ValueError):       # CUDA named but not usable here
        return None


def package_version() -> str:
    """This package's version, as installed (pyproject.toml's)."""
    try:
        return importlib.metadata.version("captioning")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def collect_env(device, precision: str) -> dict:
    """The environment of a run on `device` (a torch.device or name) at `precision`: KEYS."""
    device = torch.device(device)
    env = {"captioning": package_version(),
           "git_commit": git_commit(),
           "torch": torch.__version__,
           "torchvision": torchvision.__version__,
           "python": platform.python_version(),
           "device": str(device),
           "cpu_flags": cpu_flags(),
           "gpu": _gpu_name(device),
           "precision": precision,
           "threads": torch.get_num_threads()}
    assert tuple(env) == KEYS
    return env


def write_env(path: str | Path, device, precision: str) -> dict:
    """collect_env(device, precision), written atomically to `path` as indented JSON; returns it."""
    env = collect_env(device, precision)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(json.dumps(env, indent=2) + "\n"), "w")
    return env
