"""The GPU check: the CUDA paths the CPU test suite cannot reach, each figure beside the same run's fp32 one.

Run it on any machine with an NVIDIA GPU and this repo's Python packages (it needs no network):
  1. once, where pycocoevalcap is installed: `bash benchmarks/gpu_check.sh --prepare` (its Python files, ~0.1 MB,
     into the git-ignored .whl/site: GPU machines' images tend to lack the package);
  2. copy the repo, .whl/ included, to the GPU machine; there, from its root: `bash benchmarks/gpu_check.sh`
     (about 7 minutes; `--cpu-dry-run`: the same steps on a CPU at toy sizes, about 2 minutes);
  3. read ${OUT:-/tmp/gpu_check}/gpu_check.log (env.json and gpu_check.json beside it). Its last line is
     `gpu_check: sections=N failed=M skipped=K seconds=S dry_run=D failed_names=... key=value ...`; the exit
     status is 0 when every section ran and passed, 2 when this Python cannot run the check.
The sections, setup train cache resume caption ddp benchmarks (benchmarks/gpu_sections.py says what each does),
run each in a process of its own under its budget, all under one deadline; a failed one prints `FAILED: name`
and the others still run. Knobs (environment): GPU_CHECK_SECTIONS ("setup:90 resume:180": sections and their
budgets in s), GPU_CHECK_IMAGES (4000; dry 80), GPU_CHECK_DEADLINE_S (420; dry 900), GPU_CHECK_WORKERS (8;
dry 0), GPU_CHECK_WORK (scratch; removed unless GPU_CHECK_KEEP=1), OUT (the log's folder).
"""
import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import common
from gpu_sections import BATCH, BUDGETS, DEADLINE, DRY, IMAGES, LOG, PY, REPO, SIZE, WORK, WORKERS, figures, run

NEEDED = "torch torchvision numpy pandas PIL matplotlib yaml tqdm requests urllib3 pycocoevalcap".split()
CHECK = ("import platform, sys, torch, torchvision, captioning.train as t; print('python', platform.python_version(), "
         "'torch', torch.__version__, 'torchvision', torchvision.__version__, 'threads', torch.get_num_threads(), "
         "'cuda', torch.version.cuda, 'captioning', t.__file__); sys.exit(sys.argv[1] != '1' and not "
         "torch.cuda.is_available() and 'gpu_check: torch sees no CUDA device here (the CPU plumbing: --cpu-dry-run)')")


def prepare() -> int:
    """pycocoevalcap's Python files into .whl/site: not its jars (~100 MB), which need Java the check never runs."""
    found = importlib.util.find_spec("pycocoevalcap")
    if found is None:
        sys.exit(f"gpu_check --prepare: {PY} has no pycocoevalcap: run 'make install' first")
    dest = REPO / ".whl/site/pycocoevalcap"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(found.submodule_search_locations[0], dest, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or Path(folder, n).is_file() and not n.endswith((".py", ".txt"))
        and not n.startswith("LICENSE")])
    print(f"wrote {dest}; copy .whl/ with the repo")
    return 0


def python_path(folder: Path) -> None:                    # for this process and for every section
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(folder), os.environ.get("PYTHONPATH"))))


def python_ready() -> bool:
    """This Python has the packages, runs this repo's code (installed offline, else on PYTHONPATH) and sees CUDA."""
    if (REPO / ".whl/site").is_dir():
        python_path(REPO / ".whl/site")                   # --prepare's pycocoevalcap
    if missing := [m for m in NEEDED if importlib.util.find_spec(m) is None]:
        print(f"gpu_check: {PY} lacks {' '.join(missing)}, and this machine may have no network: stopping. "
              "(pycocoevalcap: run 'bash benchmarks/gpu_check.sh --prepare' where it is installed, copy .whl)")
        return False
    found = importlib.util.find_spec("captioning")
    if not (found and str(found.origin).startswith(f"{REPO}/src/")) and run(        # not this repo's: install it
            PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", REPO,
            check=False):
        python_path(REPO / "src")                                # that failed: its source on the path instead
    return run(PY, "-c", CHECK, int(DRY), check=False) == 0


def section(name: str, budget: int) -> int:
    """One section's exit status; 124 when out of its budget (it is then killed with every process it started)."""
    with subprocess.Popen([PY, REPO / "benchmarks/gpu_sections.py", name], start_new_session=True) as proc:
        try:
            return proc.wait(budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return 124


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same sections on the CPU at toy sizes")
    parser.add_argument("--prepare", action="store_true", help="copy pycocoevalcap's Python files to .whl/site")
    if parser.parse_args().prepare:
        return prepare()
    sys.stdout.reconfigure(line_buffering=True)                  # the sections write to the same stdout
    start, failed, skipped, sections = time.time(), [], [], BUDGETS.split()
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {'CPU dry run' if DRY else 'GPU'} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
          f"repo {REPO}, python {PY}\nwork {WORK}, log {LOG}/gpu_check.log, {IMAGES} images at {SIZE}px, "
          f"batch {BATCH}, {WORKERS} workers, deadline {DEADLINE}s")
    try:
        failed, sections = ([], sections) if python_ready() else (["python"], [])
        for name, budget in (item.split(":") for item in sections):
            left, began = int(DEADLINE - (time.time() - start)), time.time()
            if "setup" in failed or left < 20:
                skipped.append(name)
                print(f"SKIPPED: {name} ({'setup failed' if 'setup' in failed else f'{left}s left of {DEADLINE}s'})")
                continue
            print(f"\n=== {name} (budget {min(int(budget), left)}s) ===")
            if rc := section(name, min(int(budget), left)):
                failed.append(name)
            print(f"=== {name}: ok in {time.time() - began:.0f}s" if rc == 0 else f"FAILED: {name} (exit {rc}"
                  f"{', out of its budget' if rc == 124 else ''}) after {time.time() - began:.0f}s")
        env = json.loads((LOG / "env.json").read_text()) if (LOG / "env.json").is_file() else None
        common.finish("gpu_check", {"sections": len(sections), "failed": len(failed), "skipped": len(skipped),
                                    "seconds": round(time.time() - start), "dry_run": int(DRY),
                                    "failed_names": ",".join(failed) or "none", **figures()}, env,
                      LOG / "gpu_check.json")
    finally:
        if os.environ.get("GPU_CHECK_KEEP") != "1":
            shutil.rmtree(WORK, ignore_errors=True)
    return 2 if failed == ["python"] else int(bool(failed or skipped))


if __name__ == "__main__":
    sys.exit(main())
