"""`python -m captioning save`: a checkpoint as a model folder others load (captioner/folder.py),
optionally with its ONNX exports, optionally pushed to the Hugging Face Hub."""
from __future__ import annotations

import argparse
import importlib.util
import re

from ..config import EnvironmentProblem

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def export_kinds(text: str) -> list[str]:
    """--with-export: fp32, int8 or fp32,int8."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds or any(k not in ("fp32", "int8") for k in kinds) or len(set(kinds)) < len(kinds):
        raise argparse.ArgumentTypeError(f"expected fp32, int8 or fp32,int8, got {text!r}")
    return kinds


def repo_id(text: str) -> str:
    if not _REPO_ID.match(text):
        raise argparse.ArgumentTypeError(f"expected a hub id user/name, got {text!r}")
    return text


def add_save(sub) -> None:
    p = sub.add_parser("save", help="write a checkpoint as a model folder (safetensors + model "
                                    "card) that Captioner.from_pretrained and --model load",
                       description="Write a new folder: model.safetensors (the weights, no "
                                   "optimizer state), config.json (model, preprocessing, decoding "
                                   "defaults), vocab.json and README.md, a model card whose scores "
                                   "come from the evaluate report beside the checkpoint (e.g. "
                                   "test_predictions.json) when there is one.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file (a run directory means its best.pt)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--with-export", type=export_kinds, nargs="?", const=["fp32", "int8"],
                   metavar="fp32,int8",
                   help="also the ONNX exports in DIR/onnx/ (default both), for captioning "
                        "without torch (pip install -e '.[export]')")
    p.add_argument("--report", metavar="FILE.json",
                   help="the evaluate --out report whose scores the card gives (default: the "
                        "newest one beside the checkpoint, if written after it)")
    p.add_argument("--push-to-hub", type=repo_id, metavar="USER/NAME",
                   help="then upload the folder to this Hugging Face Hub repo (made if missing; "
                        "needs pip install -e '.[hub]' and a login: huggingface-cli login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.set_defaults(func=save)


def save(args) -> int:
    from ..captioner.folder import push_to_hub, save_checkpoint

    if args.push_to_hub and importlib.util.find_spec("huggingface_hub") is None:
        raise EnvironmentProblem("--push-to-hub needs huggingface_hub, which is not installed: "
                                 "pip install -e '.[hub]'")
    folder = save_checkpoint(args.checkpoint, args.out, with_export=args.with_export or (),
                             report=args.report)
    files = sorted(p.name for p in folder.iterdir())
    print(f"wrote {folder}: {', '.join(files)}; load it with Captioner.from_pretrained"
          f"({str(folder)!r}) or python -m captioning caption --model {folder} IMAGE ...")
    if args.push_to_hub:
        print(f"pushed to the hub: {push_to_hub(folder, args.push_to_hub, args.private)}")
    return 0
