"""Run a command on this CPU as if it had AVX2 and nothing newer, at this CPU's speed.

`cpuid_avx2.c`, preloaded into the command's processes, makes the CPUID instruction fault and answers it
without AVX-512, VNNI, bf16 or AMX. ONNX Runtime (MLAS), PyTorch (cpuinfo, oneDNN) and numpy then pick
the kernels an AVX2-only CPU runs: ONNX Runtime's int8 convolutions their VPMADDUBSW ones, PyTorch fp32
instead of bf16 at `precision: auto` (`device.cpu_has_bf16` asks PyTorch). The cores are still this
CPU's: its clock, caches and memory, and its AVX2 units, so the figures are what these kernels do here,
not what an older CPU would. QEMU (`cpu_portability.py`) computes what these kernels compute but does
not time them. /proc/cpuinfo, which env.json reads, still lists what the CPU has, and glibc's string
functions keep the variants they chose before the mask. Not for pytest or anything else that installs
a SIGSEGV handler (Python's faulthandler): the mask answers CPUID from one.

Needs gcc and Linux on an x86 CPU that can make CPUID fault ("cpuid_fault" in /proc/cpuinfo, as on
the AMD EPYC virtual machine of docs/benchmarks.md). First prints the vector units numpy sees under the
mask; the command does not run unless that is AVX2 without AVX-512 or VNNI.

    python benchmarks/avx2_only.py python benchmarks/decode.py --exports DIR --repeats 5
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from captioning.files import user_cache_dir

SOURCE = Path(__file__).with_name("cpuid_avx2.c")
UNITS = "from cpu_portability import vector_units; print(vector_units())"


def check_units(units: str, where: str) -> None:
    """Stop unless `units` (cpu_portability.vector_units) has AVX2 and neither AVX-512 nor VNNI."""
    have = units.split("+")
    if "avx2" not in have or any(u.startswith(("avx512", "avxvnni")) for u in have):
        raise SystemExit(f"{where}: the CPU has {units}, not AVX2 without VNNI or AVX-512")


def library() -> Path:
    """cpuid_avx2.c built once per version of it, in this user's cache folder."""
    if not Path("/proc/cpuinfo").is_file() or "cpuid_fault" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("avx2_only: this CPU (or its hypervisor) cannot make CPUID fault: no cpuid_fault "
                         "in /proc/cpuinfo; benchmarks/cpu_portability.py emulates an AVX2 CPU instead (no speed)")
    source = SOURCE.read_bytes()
    folder = user_cache_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    built = folder / f"cpuid_avx2-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if built.is_file() and built.stat().st_uid == os.getuid() and not built.stat().st_mode & 0o022:
        return built
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("avx2_only: no C compiler: apt-get install gcc")
    partial = built.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", partial, SOURCE], check=True)
    partial.chmod(0o755)
    partial.replace(built)
    return built


def environment() -> dict[str, str]:
    """This process's environment with the mask preloaded (children inherit it)."""
    preload = " ".join(p for p in (str(library()), os.environ.get("LD_PRELOAD", "")) if p)
    return {**os.environ, "LD_PRELOAD": preload}


def masked_units(env: dict[str, str]) -> str:
    """The vector units numpy sees in a process started with `env` (cpu_portability.vector_units)."""
    probe = subprocess.run([sys.executable, "-c", UNITS], capture_output=True, text=True,
                           env={**env, "PYTHONPATH": os.pathsep.join(
                               p for p in (str(Path(__file__).parent), env.get("PYTHONPATH", "")) if p)})
    if probe.returncode:
        raise SystemExit(f"avx2_only: a process with CPUID masked failed: {probe.stderr.strip()[-2000:]}")
    return probe.stdout.strip()


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    env = environment()
    units = masked_units(env)
    check_units(units, "avx2_only")
    print(f"avx2_only: CPUID masked, numpy sees {units} (/proc/cpuinfo is unchanged)", flush=True)
    return subprocess.run(sys.argv[1:], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
