"""Which engine runs a checkpoint, and the export cache that makes ONNX Runtime the default on CPUs.

    engine="torch"   PyTorch: the CaptionModel itself (decode/torch_engine.py)
    engine="onnx"    ONNX Runtime: the checkpoint's fp32 export, from the cache (made when missing)
    engine="auto"    onnx on a CPU where onnx and onnxruntime are installed (the [export] extra),
                     torch on a GPU, without the extra, or at a reduced --precision (bf16, fp16:
                     PyTorch's; an export is fp32)

The cache holds one export folder per checkpoint content and export settings,
`<root>/<checkpoint stem>-<sha256 of its bytes, 16 digits>-<settings digest>`, so a changed
checkpoint (same path, other bytes) gets a new export and never a stale one; the settings include
the exporter's revision (onnx_engine.EXPORTER_REVISION), so a newer exporter's graphs replace an
older one's. Its root is `.export-cache/` beside the checkpoint, or else, when that cannot be
written, the system's cache directory ($XDG_CACHE_HOME/captioning, ~/.cache/captioning); when
neither can be, PyTorch runs it, with one line saying why. The first use exports (a line says so,
with the time it took); later uses load the folder, and a hit needs no torch at all (only the hash
of the checkpoint's bytes). Beside the checkpoint, the exports of its earlier contents, or of other
settings, are removed once the new one is made.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..decode.onnx_engine import (
    EXPORT_FORMAT,
    EXPORTER_REVISION,
    ExportError,
    read_export,
    require_onnx,
)
from ..files import content_hash, user_cache_dir

log = logging.getLogger(__name__)
ENGINES = ("auto", "torch", "onnx")
CACHE_FOLDER = ".export-cache"     # beside the checkpoint
REDUCED = ("bf16", "fp16")         # precisions only PyTorch runs


def choose_engine(engine: str, device=None, precision: str | None = "auto") -> str:
    """"torch" or "onnx" for `engine` (auto, torch, onnx) on `device` at `precision`; an explicit
    onnx that cannot run here is a one-line error naming what is in the way."""
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch"
    on_cpu = device is None or str(device) in ("auto", "cpu")
    in_the_way = ([f"--precision {precision}"] if precision in REDUCED else []) + \
        ([] if on_cpu else [f"--device {device}"])
    if in_the_way:
        if engine == "onnx":
            raise ValueError(f"--engine onnx runs the fp32 export on the CPU: drop "
                             f"{' and '.join(in_the_way)}, or use --engine torch")
        return "torch"
    if engine == "onnx":
        require_onnx("--engine onnx", "onnx", "onnxruntime")
    elif _missing_onnx() or (device in (None, "auto") and gpu_visible()):
        return "torch"
    return "onnx"


def _missing_onnx() -> bool:
    return any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime"))


def gpu_visible() -> bool:
    """Whether PyTorch would pick a GPU (device "auto"), importing torch only where a GPU driver's
    device files exist: on a machine without them, CUDA cannot be available."""
    if "torch" not in sys.modules and not any(
            Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")):
        return False
    import torch

    return torch.cuda.is_available()


def checkpoint_file(path: str | Path) -> Path:
    """`path`, or the best.pt of a run directory: model.checkpoint.checkpoint_path without
    torch."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "best.pt").is_file():
        log.warning("%s is a run directory: using %s", path, path / "best.pt")
        path = path / "best.pt"
    if not path.is_file():
        from ..model.checkpoint import checkpoint_path  # its one-line error, whatever the case

        return checkpoint_path(path)
    return path


def settings_key(quantize: str | None = None) -> str:
    """What, besides the checkpoint, makes an export what it is: 8 hex digits."""
    try:
        version = importlib.metadata.version("captioning")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    settings = {"format": EXPORT_FORMAT, "exporter": EXPORTER_REVISION, "quantize": quantize,
                "package": version}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def cache_roots(checkpoint: Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Where exports are cached, in order: `cache_dir` or .export-cache beside the checkpoint, then
    the system's cache directory."""
    system = user_cache_dir()
    first = Path(cache_dir).expanduser() if cache_dir else checkpoint.parent / CACHE_FOLDER
    return [first] + ([system] if system != first else [])


def _writable(root: Path) -> str | None:
    """None if a folder can be made in `root` (made when missing), else why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=root, prefix=".probe-"))
    except OSError as e:
        return f"{root}: {e.strerror or e}"
    return None


def cached_export(checkpoint: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The folder of `checkpoint`'s fp32 export, loaded from the cache or made there; None (with
    one line saying why) when no cache can be written or the export fails: then PyTorch runs it."""
    checkpoint = checkpoint_file(checkpoint)
    name = f"{checkpoint.stem}-{content_hash(checkpoint)}-{settings_key()}"
    roots = cache_roots(checkpoint, cache_dir)
    for root in roots:
        if _usable(root / name):
            return root / name
    problems = []
    for i, root in enumerate(roots):
        why = _writable(root)
        if why is None:
            if problems:
                log.warning("cannot write the export cache %s: caching in %s", problems[0], root)
            return _export_into(checkpoint, root / name, pruning=i == 0 and cache_dir is None)
        problems.append(why)
    log.warning("cannot write an export cache (%s): captioning with PyTorch", "; ".join(problems))
    return None


def _usable(folder: Path) -> bool:
    """A complete export in the cache (a broken one is removed, to be made again)."""
    if not folder.is_dir():
        return False
    try:
        read_export(folder)
        return True
    except (ExportError, ValueError, OSError) as e:
        log.warning("the cached export %s is broken (%s): exporting again", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return False


def _export_into(checkpoint: Path, folder: Path, pruning: bool) -> Path | None:
    """Export `checkpoint` (fp32) into the cache folder `folder`; None if that fails."""
    from ..config import EnvironmentProblem
    from ..decode.export import export

    start = time.perf_counter()
    try:
        export(checkpoint, folder)
    except FileExistsError:          # another process exported it meanwhile
        return folder if _usable(folder) else None
    except (EnvironmentProblem, OSError, RuntimeError) as e:
        log.warning("could not export %s for ONNX Runtime (%s): captioning with PyTorch",
                    checkpoint, e)
        return None
    log.info("exported %s for ONNX Runtime in %.1f s, once: later uses load %s "
             "(--engine torch runs PyTorch)", checkpoint, time.perf_counter() - start, folder)
    if pruning:
        stale = [p for p in folder.parent.glob(f"{checkpoint.stem}-*")
                 if p != folder and p.name.count("-") == folder.name.count("-")]
        for old in stale:   # the exports of its earlier contents, or by an earlier exporter
            shutil.rmtree(old, ignore_errors=True)
    return folder
