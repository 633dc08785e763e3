"""Model folders: a trained captioner as others load it, in the Hugging Face layout.

    models/shapes/
      model.safetensors   the CaptionModel's weights and buffers, nothing else (no optimizer state)
      config.json         the model, its preprocessing and decoding defaults, the run's other keys
      vocab.json          the vocabulary, a list of tokens (ids in order)
      README.md           the model card (model_card.py): YAML front matter, then prose
      onnx/fp32, int8     optional: exports (decode/export.py), for captioning without torch

`save_checkpoint` writes one from a checkpoint, `write_model_folder` from a model in memory (into
a hidden folder beside `out`, renamed when complete: a failed save leaves nothing).
`load_model_folder` reads one back: weights from safetensors only (a pickle in their place is
refused: it could run code), checked against config.json's sha256. `resolve_folder` takes a local
folder or a hub id (`user/name`, through huggingface_hub.snapshot_download: its cache, revisions
and offline mode).
This module does not import torch until a function needs it.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..config import PATH_KEYS, Config, ConfigError, EnvironmentProblem, from_dict, to_dict
from ..data.vocab import Vocabulary

FOLDER_FORMAT = 1
WEIGHTS, CONFIG, VOCAB, CARD = "model.safetensors", "config.json", "vocab.json", "README.md"
RESIZE = "bilinear, square (no crop)"     # data.dataset.build_transform's, as the export says
PICKLES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "best.pt", "model.pkl")
EXPORTS = ("fp32", "int8")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


class ModelFolderError(ValueError):
    """A folder that is not a complete model folder, or whose files do not fit together."""


# ---------------------------------------------------------------- where a folder is

def is_hub_id(text: str) -> bool:
    """'user/name' (no such local path): a model on the Hugging Face Hub."""
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists() \
        and not text.startswith((".", "~")) and ".." not in text


def resolve_folder(path_or_id: str | Path, revision: str | None = None,
                   onnx: bool = False) -> Path:
    """A local folder, or the hub model's snapshot (downloaded once into the hub's cache; with
    HF_HUB_OFFLINE=1 from the cache only). `onnx`: also its onnx/fp32 export (all of them where
    torch is not installed)."""
    text = str(path_or_id)
    if not is_hub_id(text):
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {folder}: no such folder (a model folder `save` "
                                    "wrote, an export, or a hub id user/name)")
        return folder
    if importlib.util.find_spec("huggingface_hub") is None:
        raise EnvironmentProblem(f"{text} looks like a hub id: downloading it needs "
                                 "huggingface_hub: pip install -e '.[hub]' "
                                 "(or pass a local folder)")
    from huggingface_hub import snapshot_download

    with_torch = importlib.util.find_spec("torch") is not None   # else any export will do
    patterns = [WEIGHTS, CONFIG, VOCAB, CARD] + (
        [f"onnx/{'fp32/' if with_torch else ''}*"] if onnx else [])
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 -- offline, unknown id, no access: one line, any cause
        reason = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0][:200]
        raise EnvironmentProblem(f"model {text!r} could not be downloaded from the Hugging Face "
                                 f"Hub ({type(e).__name__}: {reason}); check the id and "
                                 "the network, or pass a local folder") from None


def folder_kind(folder: Path) -> str | None:
    """'model' (save's folder), 'export' (export's), or None."""
    if (folder / WEIGHTS).exists() or any((folder / p).is_file() for p in PICKLES):
        return "model"
    if (folder / "encoder.onnx").is_file():
        return "export"
    if (folder / CONFIG).is_file():
        meta = _json(folder, CONFIG, ModelFolderError)
        if isinstance(meta, dict) and "folder_format" in meta:
            return "model"
    return None


# ---------------------------------------------------------------- reading

def _json(folder: Path, name: str, error=None):
    path = folder / name
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; a model folder holds {WEIGHTS}, {CONFIG} and "
                               f"{VOCAB} (write one with python -m captioning save "
                               "--checkpoint CKPT --out DIR)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise (error or ModelFolderError)(f"{path}: not readable JSON ({e})") from None


def read_config(folder: Path) -> tuple[Config, dict]:
    """(Config, config.json's dict) of a model folder, checked."""
    meta = _json(folder, CONFIG)
    path = folder / CONFIG
    if not isinstance(meta, dict) or meta.get("folder_format") != FOLDER_FORMAT:
        version = meta.get("folder_format") if isinstance(meta, dict) else None
        raise ModelFolderError(f"{path}: model folder format {version!r}, this version reads "
                               f"{FOLDER_FORMAT}")
    missing = [k for k in ("model", "preprocessing", "decoding", "run") if k not in meta]
    if missing:
        raise ModelFolderError(f"{path}: lacks {', '.join(missing)}")
    from ..data.dataset import IMAGENET_MEAN, IMAGENET_STD  # imports torch, as building does

    pre, decoding = meta["preprocessing"], meta["decoding"]
    if (pre.get("resize"), tuple(pre.get("mean", ())), tuple(pre.get("std", ()))) != \
            (RESIZE, IMAGENET_MEAN, IMAGENET_STD):
        raise ModelFolderError(f"{path}: preprocessing {pre} is not the one this package "
                               f"trains and captions with ({RESIZE}, ImageNet mean and std)")
    raw = copy.deepcopy(meta["run"])
    raw["model"] = dict(meta["model"], pretrained=False)   # the weights come from the folder
    raw.setdefault("data", {}).update(image_size=pre.get("image_size"),
                                      max_words=decoding.get("max_words"))
    try:
        cfg = from_dict(raw, check_paths=False, source=str(path))
    except ConfigError as e:
        raise ModelFolderError(f"{path}: {e}") from None
    return cfg, meta


def read_vocab(folder: Path) -> Vocabulary:
    tokens = _json(folder, VOCAB)
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise ModelFolderError(f"{folder / VOCAB}: expected a list of tokens")
    try:
        return Vocabulary.from_list(tokens)
    except ValueError as e:
        raise ModelFolderError(f"{folder / VOCAB}: {e}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _not_safetensors(path: Path) -> str | None:
    """Why `path` is no safetensors file (a pickle, a zip archive), or None if its start fits."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's pickle format)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    if len(head) < 9 or head[8:9] != b"{":
        return "not a safetensors file (truncated, or other data)"
    return None


def read_weights(folder: Path, meta: dict) -> dict:
    """model.safetensors' tensors (CPU); ModelFolderError naming the file when it is missing, a
    pickle, damaged or truncated, or not the file config.json records."""
    path = folder / WEIGHTS
    if not path.is_file():
        pickles = [p for p in PICKLES if (folder / p).is_file()]
        hint = (f"; {', '.join(pickles)} is a pickle, refused: it could run code when loaded"
                if pickles else "")
        raise ModelFolderError(f"{path}: missing{hint} (loading reads safetensors only; write the "
                               "folder with python -m captioning save --checkpoint CKPT)")
    why = _not_safetensors(path)
    if why is not None:
        raise ModelFolderError(f"{path}: {why}, refused: loading reads safetensors only "
                               "(a pickle could run code when loaded)")
    recorded = meta.get("weights", {}).get("sha256")
    if recorded and _sha256(path) != recorded:
        raise ModelFolderError(f"{path}: its sha256 is not the one {CONFIG} records: damaged, "
                               "truncated or replaced (download or save the folder again)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{path}: damaged or truncated safetensors file ({e})") from None


def load_model_folder(folder: str | Path, device="cpu"):
    """(CaptionModel in eval mode, Vocabulary, Config, config.json's dict) of a model folder."""
    from ..model.caption_model import build_model

    folder = Path(folder)
    cfg, meta = read_config(folder)
    vocab = read_vocab(folder)
    weights = read_weights(folder, meta)
    rows = weights.get("head.weight")
    if rows is not None and rows.shape[0] != len(vocab):
        raise ModelFolderError(f"{folder / VOCAB}: {len(vocab)} tokens, but {WEIGHTS}'s output "
                               f"layer has {rows.shape[0]} words: the files of two models?")
    model = build_model(cfg.model, len(vocab), vocab.pad)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ModelFolderError(f"{folder / CONFIG}: describes another model than {WEIGHTS} "
                               f"holds ({first})") from None
    return model.to(device).eval(), vocab, cfg, meta


# ---------------------------------------------------------------- writing

def folder_config(cfg: Config, vocab: Vocabulary, source: dict, weights: dict) -> dict:
    """config.json: each top-level key one thing; `run` keeps the rest of the run's config."""
    from ..data.dataset import IMAGENET_MEAN, IMAGENET_STD

    raw = to_dict(cfg)
    given = source.get("paths_given") or {}
    for key in PATH_KEYS:                 # paths as the user wrote them, not this machine's
        section, _, name = key.rpartition(".")
        if key in given:
            (raw[section] if section else raw)[name] = given[key]
    model = raw.pop("model")
    raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("image_size", "max_words")}
    return {"folder_format": FOLDER_FORMAT, "library_name": "captioning",
            "architecture": f"{cfg.model.backbone} + torch.nn.Transformer (CaptionModel)",
            "vocab_size": len(vocab), "model": model,
            "preprocessing": {"image_size": cfg.data.image_size, "resize": RESIZE,
                              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "decoding": {"max_words": cfg.data.max_words},
            "run": raw, "weights": weights,
            "source": {k: v for k, v in source.items() if k != "paths_given"}}


def _export_kinds(with_export) -> tuple[str, ...]:
    """The exports asked for, checked (and their packages there) before any work."""
    from ..decode.onnx_engine import require_onnx

    kinds = tuple(with_export or ())
    unknown = [k for k in kinds if k not in EXPORTS]
    if unknown:
        raise ValueError(f"--with-export {','.join(unknown)}: expected fp32, int8 or both")
    if kinds:
        require_onnx("save --with-export", "onnx", "onnxruntime",
                     *(["onnx_ir"] if "int8" in kinds else []))
    return kinds


def write_model_folder(model, vocab: Vocabulary, cfg: Config, out: str | Path, *,
                       source: dict | None = None, with_export=(), card_facts=None) -> Path:
    """The folder `out` (new or empty) for `model` (fp32); `source`: where it came from
    ({"checkpoint", "epoch", "val_loss", ...}); `card_facts`: model_card.gather's (else none)."""
    import torch
    from safetensors.torch import save_file

    from ..decode.export import export_model
    from .model_card import model_card

    kinds, out = _export_kinds(with_export), _new_folder(out)
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in model.state_dict().values()):
        raise ValueError("the model's weights are not all fp32 (a Captioner made with precision "
                         "bf16 or auto casts its ResNet): use python -m captioning save, or "
                         "Captioner.from_checkpoint(path, engine='torch', precision='fp32')")
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
        weights = {"file": WEIGHTS, "sha256": _sha256(folder / WEIGHTS),
                   "tensors": len(tensors), "dtype": "float32"}
        meta = folder_config(cfg, vocab, source or {}, weights)
        meta["onnx"] = {k: f"onnx/{k}" for k in kinds}
        _write_json(folder / VOCAB, vocab.to_list())
        _write_json(folder / CONFIG, meta)
        on_cpu = (model if next(model.parameters()).device.type == "cpu"
                  else copy.deepcopy(model).cpu())       # the export traces on the CPU
        for kind in kinds:
            (folder / "onnx").mkdir(exist_ok=True)
            export_model(on_cpu.eval(), vocab, cfg, folder / "onnx" / kind,
                         None if kind == "fp32" else kind, (source or {}).get("checkpoint", out))
        facts = {"parameters": sum(p.numel() for p in model.parameters()), **(card_facts or {})}
        (folder / CARD).write_text(model_card(out.name, meta, facts), encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.rename(folder, out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return out


def _new_folder(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists: name a new folder (or remove this one)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def checkpoint_facts(checkpoint: str | Path,
                     report: str | Path | None = None) -> tuple[Path, dict, dict]:
    """(the checkpoint file (a run directory: its best.pt), config.json's `source`, the card's facts
    from the run directory beside it: env.json, history.csv, splits.json and the `evaluate`
    report, `report` or else one found there)."""
    from ..model.checkpoint import checkpoint_path, read_checkpoint
    from .model_card import gather

    path = checkpoint_path(checkpoint)
    ckpt = read_checkpoint(path)
    source = {"checkpoint": path.name, "epoch": ckpt.get("epoch"), "val_loss": ckpt.get("val_loss"),
              "val_cider": ckpt.get("val_cider"), "paths_given": ckpt.get("paths_given")}
    return path, source, gather(path, report)


def save_checkpoint(checkpoint: str | Path, out: str | Path, *, with_export=(),
                    report: str | Path | None = None) -> Path:
    """`python -m captioning save`: the model folder of a checkpoint, with its card."""
    from ..model.checkpoint import load_checkpoint

    _export_kinds(with_export)
    _new_folder(out)
    path, source, facts = checkpoint_facts(checkpoint, report)
    model, vocab, cfg = load_checkpoint(path)
    return write_model_folder(model.float(), vocab, cfg, out, source=source,
                              with_export=with_export, card_facts=facts)


def pick_pretrained(path_or_id: str | Path, engine: str = "auto", device=None,
                    precision: str | None = "auto",
                    revision: str | None = None) -> tuple[str, Path]:
    """("model", a model folder) for PyTorch or ("export", an export folder) for ONNX Runtime:
    an export as it is; a model folder's onnx/fp32 where `engine` (engines.choose_engine) picks
    ONNX Runtime, and any of its exports where torch is not installed."""
    from .engines import choose_engine

    folder = resolve_folder(path_or_id, revision, onnx=engine != "torch")
    kind = folder_kind(folder)
    if kind is None:
        raise ModelFolderError(f"{folder}: neither a model folder ({WEIGHTS}, {CONFIG}, {VOCAB}: "
                               "`save` writes one) nor an export (`export` writes one)")
    if kind == "export" or engine == "torch":
        if kind == "export" and engine == "torch":
            raise ValueError(f"--engine torch: {folder} is an ONNX export; give its model "
                             "folder or checkpoint")
        return kind, folder
    exports = [folder / "onnx" / k for k in EXPORTS if (folder / "onnx" / k).is_dir()]
    if choose_engine(engine, device, precision) == "onnx":
        if exports and exports[0].name == "fp32":
            return "export", exports[0]
        if engine == "onnx":
            raise ModelFolderError(f"--engine onnx: {folder} holds no onnx/fp32 export (save "
                                   "--with-export fp32 writes one); --engine torch runs it")
    if importlib.util.find_spec("torch") is None and exports:
        return "export", exports[0]          # no torch here: an export is the only way
    return "model", folder


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a model folder to the Hugging Face Hub (a thin call: creates the repo if needed, then
    huggingface_hub.upload_folder); returns the commit's URL."""
    if importlib.util.find_spec("huggingface_hub") is None:
        raise EnvironmentProblem("--push-to-hub needs huggingface_hub: pip install -e '.[hub]'")
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, private=private, exist_ok=True)
    info = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                         commit_message="captioning save --push-to-hub")
    return str(getattr(info, "commit_url", info))
