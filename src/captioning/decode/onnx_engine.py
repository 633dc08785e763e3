"""Captioning from an export (see export.py) on ONNX Runtime: the same Captioner, another engine.

    captioner = Captioner.from_export("exports/shapes")   # what `python -m captioning export` wrote
    captioner.caption(["photo.jpg"], beam_size=3)

`OrtEngine` is a `search.Engine`: its `init_cache` runs start.onnx, its `step` runs step.onnx, and
the cache is the model's own `DecoderCache` (of the numpy arrays ONNX Runtime returns), so all of
search.py runs on either engine. `OrtEncoder` runs encoder.onnx in place of the PyTorch encoder,
with the preprocessing done by PIL and numpy: this path imports neither torch nor torchvision nor
pandas nor matplotlib.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import EnvironmentProblem, from_dict
from ..data.vocab import Vocabulary
from ..model.kv_cache import DecoderCache

log = logging.getLogger(__name__)
EXPORT_FORMAT = 1
# the exporter's graphs: raised when a checkpoint would export to other graphs than before (the
# captions the same, the graphs faster), so that engine="auto" makes its cached exports again
EXPORTER_REVISION = 2
FILES = ("encoder.onnx", "encoder.onnx.data", "start.onnx", "step.onnx", "vocab.json",
         "preprocess.json", "config.json")


class MissingExtra(EnvironmentProblem):
    """An optional dependency is not installed; the message says what to install."""


class ExportError(ValueError):
    """A folder that is not a complete export (or not one this version reads)."""


def require_onnx(what: str, *modules: str) -> None:
    """MissingExtra naming what to install when a module of `modules` (default onnxruntime) is
    missing."""
    missing = [m for m in modules or ("onnxruntime",) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{what} needs {' and '.join(missing)}, which is not installed: "
                           f"pip install -e '.[export]' (or pip install {' '.join(missing)})")


SPIN_WITHIN_RUN = True     # False: the threads never spin (benchmarks/session_threads.py compares)
SPIN_ENV = "CAPTIONING_ORT_SPIN"    # 0: never spin either (a machine whose cores others share)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus() -> float:
    """The CPUs this process may run on (its affinity), less a cgroup v2 CPU quota below that."""
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = float(len(affinity(0)) if affinity else os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return cpus if quota == "max" else min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        return cpus


def spins(threads: int | None) -> bool:
    """Whether a session's threads spin within a run: yes, unless SPIN_ENV says 0 or the threads
    (None: one a core) outnumber the CPUs this process may use, where spinning takes CPU time
    from the other threads instead of idle cores."""
    if not SPIN_WITHIN_RUN or os.environ.get(SPIN_ENV, "").strip() == "0":
        return False
    return (threads or os.cpu_count() or 1) <= usable_cpus()


def load_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of one graph, all optimisations on; threads None: one a core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # threads spin between a run's operators (no wake-up per operator), and stop when the run
    # returns: three sessions take turns on the same cores, and threads that went on spinning after
    # a run starved the next session's (docs/design.md, "The sessions"; `spins` says where not);
    # no arena, and initializers outside it, for a smaller peak RSS
    spin = "1" if spins(threads) else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _array(x) -> np.ndarray:
    """A contiguous numpy array of x (an array, or a CPU tensor handed in by a caller)."""
    return np.ascontiguousarray(x if isinstance(x, np.ndarray) else x.detach().cpu().numpy())


class OrtEngine:
    """start.onnx and step.onnx as a search.Engine (numpy arrays in, numpy arrays out)."""

    def __init__(self, start, step, pad_id: int):
        self.start, self.step_session, self.pad_id = start, step, pad_id
        self.layers = sum(1 for i in start.get_outputs() if i.name.startswith("cross_k_"))

    def init_cache(self, memory: np.ndarray, group: int = 1) -> DecoderCache:
        """An empty cache for M * group sequences, `group` per image of memory (M, L, D)."""
        kv = self.start.run(None, {"memory": _array(memory).astype(np.float32, copy=False)})
        M, H, _, hd = kv[0].shape
        empty = np.zeros((M * group, H, 0, hd), np.float32)
        n = self.layers
        return DecoderCache([empty] * n, [empty] * n, kv[:n], kv[n:])

    def step(self, cache: DecoderCache, tokens: np.ndarray,
             attention: list | None = None) -> np.ndarray:
        """CaptionModel.step on step.onnx: tokens (N,) at position cache.length -> logits (N, V);
        the cache grows."""
        n = self.layers
        feeds = {"tokens": _array(tokens).astype(np.int64, copy=False),
                 "position": np.array(cache.length, np.int64)}
        for name, ts in (("self_k", cache.self_k), ("self_v", cache.self_v),
                         ("cross_k", cache.cross_k), ("cross_v", cache.cross_v)):
            feeds.update({f"{name}_{i}": _array(t) for i, t in enumerate(ts)})
        out = self.step_session.run(None, feeds)
        cache.self_k[:], cache.self_v[:] = out[1:1 + n], out[1 + n:1 + 2 * n]
        if attention is not None:
            attention.extend(out[-1])                               # per layer (N, H, L)
        return out[0]                                               # (N, V)


def _read_json(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{folder / name}: not readable JSON ({e}); "
                          "export the checkpoint again") from None


def read_export(folder: str | Path) -> dict:
    """The export's JSON files, checked: {"config": Config, "vocab": Vocabulary, "preprocess",
    "quantize", ...}."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: not a folder; make one with "
                                "python -m captioning export --checkpoint CKPT --out DIR")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder}: not a complete export, missing {', '.join(missing)}; "
                          "make one with python -m captioning export --checkpoint CKPT --out DIR")
    meta = _read_json(folder, "config.json")
    if not isinstance(meta, dict) or meta.get("format_version") != EXPORT_FORMAT:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ExportError(f"{folder / 'config.json'}: export format {version!r}, "
                          f"this version reads {EXPORT_FORMAT}; export the checkpoint again")
    tokens, pre = _read_json(folder, "vocab.json"), _read_json(folder, "preprocess.json")
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise ExportError(f"{folder / 'vocab.json'}: expected a list of tokens")
    if not (isinstance(pre, dict) and {"image_size", "mean", "std"} <= pre.keys()):
        raise ExportError(f"{folder / 'preprocess.json'}: expected image_size, mean and std")
    cfg = from_dict(meta["config"], check_paths=False, source=str(folder / "config.json"))
    return {**meta, "config": cfg, "vocab": Vocabulary.from_list(tokens), "preprocess": pre,
            "folder": folder}


def _check_runtime(export: dict) -> None:
    """An int8 export's graphs run 8-bit MatMulNBits, which ONNX Runtime has on x86 from 1.22."""
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if export.get("int8") and version < (1, 22):
        raise ExportError(f"{export['folder']}: its int8 graphs need onnxruntime 1.22 or newer "
                          f"(8-bit MatMulNBits), this is {onnxruntime.__version__}: "
                          "pip install -U onnxruntime")


def cpu_features() -> dict[str, bool]:
    """What the CPU has (AVX2, AVX512VNNI, AVXVNNI, ...), as numpy's dispatcher reads it from CPUID:
    the source ONNX Runtime picks its kernels by (/proc/cpuinfo may tell another story, e.g. under
    an emulator)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:                                                    # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return dict(features)


def int8_sums_saturate() -> bool:
    """Whether ONNX Runtime's int8 convolutions on this CPU add pairs of products in a saturating
    int16 (VPMADDUBSW): an x86 CPU without VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    features = cpu_features()
    return not (features.get("AVX512VNNI") or features.get("AVXVNNI"))


def encoder_recipe(export: dict) -> dict | None:
    """An export's int8 encoder recipe (config.json's int8.encoder: weights, calibration, ...), or
    None for an fp32 encoder."""
    int8 = export.get("int8")
    encoder = int8.get("encoder") if isinstance(int8, dict) else None
    return encoder if isinstance(encoder, dict) else None


def _warn_full_range(export: dict) -> None:
    """A warning when an int8 encoder with full-range weights (made before they were kept within
    -64..64) runs where its sums can saturate: its captions may then differ (design.md)."""
    recipe = encoder_recipe(export)
    if recipe is not None and recipe.get("weights") == "int8" and int8_sums_saturate():
        log.warning("%s: its int8 encoder has full-range weights, which this CPU's int8 kernels "
                    "(x86 without VNNI) can saturate, so some captions may differ from a VNNI "
                    "CPU's: export the checkpoint again (its weights are then kept within -64..64)",
                    export["folder"])


def preprocess(image: Image.Image, image_size: int, mean, std) -> np.ndarray:
    """data.build_transform with PIL and numpy: square bilinear resize, [0, 1], normalise ->
    (3, S, S)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    x = np.asarray(image.resize((image_size, image_size), Image.BILINEAR),
                   dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class OrtEncoder:
    """encoder.onnx as the Captioner's encoder: preprocessed images (B, 3, S, S) -> memory
    (B, L, d_model), fp32, with the preprocessing done by PIL and numpy. Its grid features are not
    exposed (one graph makes memory)."""

    device = "cpu"

    def __init__(self, session, pre: dict, precision: str):
        self.session, self.precision = session, precision   # the decoder's; this graph is fp32
        self.transform = functools.partial(preprocess, image_size=pre["image_size"],
                                           mean=pre["mean"], std=pre["std"])

    def inference(self):
        return contextlib.nullcontext()

    @staticmethod
    def as_memory(x) -> np.ndarray:
        """Memory as the engine reads it: a numpy array (a CPU tensor handed in is converted)."""
        return _array(x)

    def memory(self, *, images: np.ndarray | None = None,
               features: np.ndarray | None = None) -> np.ndarray:
        if features is not None or images is None:
            raise ValueError("an export's memory() takes images= only "
                             "(cached features need the checkpoint)")
        return self.session.run(None, {"images": _array(images).astype(np.float32, copy=False)})[0]


def load_export(folder: str | Path,
                threads: int | None = None) -> tuple[OrtEncoder, OrtEngine, dict]:
    """The encoder and the engine of an export, and its JSON files (read_export); `threads` None:
    one a core."""
    require_onnx("captioning from an export")
    export = read_export(folder)
    _check_runtime(export)
    _warn_full_range(export)
    folder = export["folder"]
    encoder = OrtEncoder(load_session(folder / "encoder.onnx", threads), export["preprocess"],
                         export.get("quantize") or "fp32")
    engine = OrtEngine(load_session(folder / "start.onnx", threads),
                       load_session(folder / "step.onnx", threads), export["vocab"].pad)
    return encoder, engine, export
