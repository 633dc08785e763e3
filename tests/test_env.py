"""env.json: what a run ran on (versions, commit, device, CPU vector units)."""
import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

import captioning
from captioning import env
from captioning.env import KEYS, collect_env, cpu_flags, git_commit, write_env

REPO = Path(__file__).resolve().parent.parent
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 {extra}
bogomips\t: 4000.00

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 {extra}
"""


def test_keys_and_types():
    e = collect_env(torch.device("cpu"), "fp32")
    assert tuple(e) == KEYS == ("captioning", "git_commit", "torch", "torchvision", "python", "device",
                                "cpu_flags", "gpu", "precision", "threads")
    assert e["captioning"] == captioning.__version__
    assert e["git_commit"] is None or isinstance(e["git_commit"], str)
    assert (e["torch"], e["torchvision"]) == (torch.__version__, torchvision.__version__)
    assert e["python"] == platform.python_version()
    assert (e["device"], e["gpu"], e["precision"]) == ("cpu", None, "fp32")
    assert e["threads"] == torch.get_num_threads() and isinstance(e["threads"], int)
    assert set(e["cpu_flags"]) == {"model", "avx2", "avx512", "avx512_bf16", "amx"}
    assert all(v is None or isinstance(v, bool) for k, v in e["cpu_flags"].items() if k != "model")
    json.dumps(e)                                                    # plain values only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_named_without_cuda_gives_no_gpu_name():
    e = collect_env("cuda", "bf16")
    assert (e["device"], e["gpu"], e["precision"]) == ("cuda", None, "bf16")


@needs_git
def test_git_commit_is_this_checkouts_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    commit = collect_env("cpu", "fp32")["git_commit"]
    # others may edit tracked files meanwhile: the hash must match, the suffix may be either
    assert commit in (head.stdout.strip(), head.stdout.strip() + "-dirty")


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                   cwd=repo, check=True, capture_output=True)


@needs_git
def test_git_commit_clean_dirty_untracked_and_outside(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))    # never find a checkout above tmp_path
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    assert git_commit(repo / "pkg") is None                          # no checkout at all
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("venv/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    assert git_commit(repo / "pkg") == head
    (repo / "pkg" / "new.py").write_text("")                         # untracked: still clean
    assert git_commit(repo / "pkg") == head
    (repo / "pkg" / "mod.py").write_text("x = 2\n")                  # a tracked change: dirty
    assert git_commit(repo / "pkg") == head + "-dirty"
    (repo / "venv" / "site-packages" / "pkg").mkdir(parents=True)    # an installed copy inside the checkout
    (repo / "venv" / "site-packages" / "pkg" / "mod.py").write_text("")
    assert git_commit(repo / "venv" / "site-packages" / "pkg") is None


def test_git_commit_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))                        # no git on the PATH
    assert git_commit(REPO) is None
    assert collect_env("cpu", "fp32")["git_commit"] is None


@pytest.mark.parametrize("extra, expected", [
    ("", {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False}),
    ("avx512f avx512bw avx512_bf16", {"avx2": True, "avx512": True, "avx512_bf16": True, "amx": False}),
    ("avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", {"avx2": True, "avx512": True, "avx512_bf16": True,
                                                        "amx": True}),
])
def test_cpu_flags_from_a_fake_cpuinfo(tmp_path, monkeypatch, extra, expected):
    fake = tmp_path / "cpuinfo"
    fake.write_text(X86.format(extra=extra))
    monkeypatch.setattr(env, "CPUINFO", str(fake))
    flags = collect_env("cpu", "bf16")["cpu_flags"]
    assert flags == {"model": "Intel(R) Xeon(R) Platinum 8480+", **expected}


def test_cpu_flags_on_arm_and_without_cpuinfo(tmp_path, monkeypatch):
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n")
    assert cpu_flags(arm) == {"model": cpu_flags(arm)["model"], "avx2": False, "avx512": False,
                              "avx512_bf16": False, "amx": False}
    monkeypatch.setattr(env, "CPUINFO", str(tmp_path / "missing"))
    flags = cpu_flags()
    assert {k: v for k, v in flags.items() if k != "model"} == dict.fromkeys(("avx2", "avx512", "avx512_bf16",
                                                                               "amx"))
    assert flags["model"] is None or isinstance(flags["model"], str)


def test_write_env_writes_readable_json(tmp_path):
    path = tmp_path / "run" / "env.json"
    written = write_env(path, torch.device("cpu"), "fp32")
    assert json.loads(path.read_text()) == written
    assert tuple(written) == KEYS
    assert path.read_text().startswith("{\n  \"captioning\"")          # indented
    assert [p.name for p in path.parent.iterdir()] == ["env.json"]     # no temporary file left behind
    write_env(path, "cpu", "bf16")                                     # overwrites in place
    assert json.loads(path.read_text())["precision"] == "bf16"
