"""An image captioner: a frozen ResNet encoder and a torch.nn.Transformer decoder, trained and \
used from here.

examples:
  python -m captioning shapes data/shapes --images 3000          # the synthetic demo data set
  python -m captioning train --config configs/shapes.yaml         # train; --set key=value overrides the config
  python -m captioning train --config configs/shapes.yaml --resume auto   # continue the run, or start it
  python -m captioning caption --checkpoint runs/shapes/best.pt photo.jpg https://example.com/cat.png
  python -m captioning export --checkpoint runs/shapes/best.pt --out exports/shapes --quantize int8
  python -m captioning caption --model exports/shapes photos/        # the export, on ONNX Runtime (CPU)
  python -m captioning save --checkpoint runs/shapes/best.pt --out models/shapes   # a model folder to share
  python -m captioning evaluate --checkpoint runs/shapes/best.pt --out report.json
  python -m captioning check-data --config configs/coco.yaml --out check.json     # before hours of training
  python -m captioning score --predictions preds.jsonl --references data/coco/annotations --split test
  python -m captioning extract-features --config configs/flickr30k.yaml
  python -m captioning shards --config configs/flickr30k.yaml --out data/shards   # WebDataset tar shards
  python -m captioning serve --model exports/shapes --port 8000          # HTTP API + web page (pip install -e '.[serve]')
  torchrun --nproc_per_node=4 -m captioning train --config configs/flickr30k.yaml

Errors are one line on stderr; --debug (or CAPTIONING_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from ..config import ConfigError, EnvironmentProblem
from . import commands
from .args import positive_int
from .commands import INTERRUPTED, Interrupted
from .save import add_save
from .serve import add_serve
from .shards import add_shards


def device_name(text: str) -> str:
    """--device: checked before any work, so a machine without a GPU says so at once."""
    from ..device import resolve_device

    try:
        resolve_device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _common(p: argparse.ArgumentParser, *, config: bool = False, device: bool = True) -> None:
    if config:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    if device:
        p.add_argument("--device", type=device_name, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model from a YAML config; every file of the run goes "
                                   "to the config's run_dir.")
    p.add_argument("--config", help="YAML config, e.g. configs/shapes.yaml")
    _common(p, config=True, device=False)
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue the run in RUN_DIR, or with 'auto' the config's run_dir if it "
                        "holds a last.pt")
    p.set_defaults(func=commands.train)


def _add_caption(sub) -> None:
    p = sub.add_parser("caption", help="caption images: files, folders, globs, http(s) URLs",
                       description="Caption images given as files, folders, globs, http(s) URLs, "
                                   "list files or WebDataset shards; a bad input gets an error "
                                   "line and the others still get captions (exit 1 if any "
                                   "failed). Across processes: torchrun --nproc_per_node=N -m "
                                   "captioning caption --out FILE ... (each rank captions its "
                                   "share into FILE.parts/, rank 0 merges them into FILE in "
                                   "input order; the same command goes on after a kill).")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a checkpoint file (a run directory means its best.pt)")
    model.add_argument("--model", metavar="DIR|USER/NAME",
                       help="a model folder `save` wrote (or its hub id user/name), or a folder "
                            "`export` wrote, run on ONNX Runtime")
    p.add_argument("--beam", type=positive_int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line per input, in input order")
    p.add_argument("--out", metavar="FILE.jsonl|FILE.csv",
                   help="append the results to this file, skipping the inputs already in it")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --out: caption again the inputs whose row is an error")
    p.add_argument("--redo", action="store_true",
                   help="with --out: caption again the inputs whose row another model made")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images captioned at a time")
    _common(p)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 where the GPU or CPU has bf16 units, else fp32 "
                        "(fp16: CUDA only)")
    engine_flag(p)
    _decoding_flags(p)
    p.add_argument("--attention", metavar="DIR",
                   help="also draw each caption's attention maps, a PNG per input")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (their images, recursively), globs "
                        "('photos/**/*.jpg'), http(s) URLs, @LIST (a file of inputs, one a "
                        "line) and WebDataset shards ('shards/test-{000000..000009}.tar': each "
                        "sample named SHARD.tar#KEY)")
    p.set_defaults(func=commands.caption)


def engine_flag(p: argparse.ArgumentParser) -> None:
    """--engine for a command that captions from a checkpoint."""
    p.add_argument("--engine", choices=["auto", "torch", "onnx"], default="auto",
                   help="what runs a --checkpoint: auto (default) = ONNX Runtime on a CPU where "
                        "the [export] extra is installed (the checkpoint is exported once, into "
                        "a cache), else PyTorch")


def _decoding_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding",
                             "how captions are chosen (Captioner.caption's keyword arguments)")
    g.add_argument("--num-captions", type=positive_int,
                   help="the n best captions of beam search (or n samples)")
    g.add_argument("--max-words", type=positive_int,
                   help="longest caption (default: the run's data.max_words)")
    g.add_argument("--length-penalty", type=float,
                   help="beam score = sum of log-probs / len ** this (default 1)")
    g.add_argument("--temperature", type=float,
                   help="sample instead of searching, at this temperature")
    g.add_argument("--top-k", type=int, help="sample from the k likeliest words only")
    g.add_argument("--top-p", type=float,
                   help="sample from the likeliest words whose probability reaches p")
    g.add_argument("--seed", type=int, help="sampling: the same seed gives the same captions")
    g.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")
    g.add_argument("--min-words", type=int, help="no caption shorter than this")
    g.add_argument("--allow-function-word-end", action="store_true", default=None,
                   help="let a caption end on a function word (a, an, the, of, on, in, with, and)")
    g.add_argument("--attention-layer", type=int,
                   help="attention maps of this decoder layer (default: mean of all)")
    g.add_argument("--attention-head", type=int,
                   help="attention maps of this head (default: mean of all)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on a held-out split",
                       description="Caption every image of a held-out split and score the captions "
                                   "(BLEU-1..4, METEOR, ROUGE-L, CIDEr). The split's image names "
                                   "come from the run's splits.json beside the checkpoint; the "
                                   "data paths from the config saved in the checkpoint: if the "
                                   "data moved, --set data.images=... --set data.captions=...")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file (a run directory means its best.pt)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="which split (default test)")
    p.add_argument("--beam", type=positive_int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--out", help="write metrics, predictions, references and env.json's facts to "
                                 "this JSON file")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                   help="where the data is now, e.g. --set data.images=/new/images "
                        "(data keys only; repeatable)")
    _common(p)
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="default: the run's train.precision, as its validation scores were "
                        "computed")
    engine_flag(p)
    _decoding_flags(p)
    p.set_defaults(func=commands.evaluate)


def _add_other(sub) -> None:
    p = sub.add_parser("extract-features",
                       help="cache the frozen encoder's features of every image (fp16)",
                       description="Run the frozen encoder once over every image of a config's "
                                   "data set into a fp16 feature cache under data.features_dir; "
                                   "an interrupted run goes on.")
    p.add_argument("--config", required=True,
                   help="the training config (its model.backbone, data.*)")
    _common(p, config=True)
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images through the encoder at a time")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the ResNet; auto times PyTorch and ONNX Runtime on the "
                        "first batch")
    p.set_defaults(func=commands.extract_features)

    p = sub.add_parser("export",
                       help="export a checkpoint to ONNX for fast CPU captioning (caption --model)",
                       description="Write the encoder, the decoder's start and its step as ONNX "
                                   "graphs, with the vocabulary, preprocessing and config as JSON, "
                                   "into a new folder, after checking that the graphs give the "
                                   "checkpoint's logits (else nothing is written). Needs "
                                   "pip install -e '.[export]'.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file (a run directory means its best.pt)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--quantize", choices=["int8"],
                   help="int8 weights in the decoder's matrix products, and an int8 encoder "
                        "(static, calibrated) unless --encoder fp32")
    p.add_argument("--encoder", choices=["int8", "fp32"],
                   help="with --quantize int8: the encoder's precision (default int8)")
    p.add_argument("--calibration", metavar="DIR",
                   help="the int8 encoder's calibration images: a sample of the image files in "
                        "DIR (default: of the run's training split)")
    p.set_defaults(func=commands.export)

    p = sub.add_parser("shapes",
                       help="generate the synthetic Shapes data set (Kaggle Flickr30k layout)",
                       description="Generate the synthetic Shapes data set into a new or empty "
                                   "folder: OUT_DIR/flickr30k_images/*.png, OUT_DIR/results.csv "
                                   "and its ground truth.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--images", type=positive_int, default=3000,
                   help="how many images (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same data set")
    p.set_defaults(func=commands.shapes)


def _add_data_commands(sub) -> None:
    p = sub.add_parser("check-data",
                       help="check a data set before training: captions, every image, splits",
                       description="Read a config's captions and open every image (in parallel), "
                                   "then report missing, unreadable and small images, empty and "
                                   "duplicate captions, caption lengths, the vocabulary and <unk> "
                                   "share, and the split sizes. Exit 1 when no usable image is "
                                   "left.")
    p.add_argument("--config", required=True, help="the training config (its data.* keys)")
    _common(p, config=True, device=False)
    p.add_argument("--out", help="also write the report to this JSON file")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="threads opening images (default 2 per CPU)")
    p.set_defaults(func=commands.check_data)

    p = sub.add_parser("score", help="score any model's predictions against references (BLEU, "
                                     "METEOR, ROUGE-L, CIDEr-D)",
                       description="Score predictions (JSON Lines of image/caption or "
                                   "input/caption as caption --json writes, CSV image,caption, or "
                                   "COCO's results format [{image_id, caption}]) against "
                                   "references in any format the training data may have, as "
                                   "evaluate scores a checkpoint. Images with a prediction and no "
                                   "references (or the reverse) are named and left out.")
    p.add_argument("--predictions", required=True, help="the predictions file")
    p.add_argument("--references", required=True,
                   help="a captions file (results.csv, dataset_coco.json, a CSV or JSON Lines) or "
                        "COCO's annotations/")
    p.add_argument("--format", default="auto",
                   choices=["auto", "flickr30k", "karpathy", "coco", "csv", "jsonl"],
                   help="the references' format (default: told from the file)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="score only this split of the references (their own split, or --splits)")
    p.add_argument("--splits", metavar="SPLITS_JSON",
                   help="the split to pick from: a run's splits.json")
    p.add_argument("--split-seed", type=int, default=0,
                   help="the seed that halves COCO val2017 into val and test")
    p.add_argument("--out",
                   help="write metrics, predictions, references and notes to this JSON file")
    p.set_defaults(func=commands.score)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's own prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m captioning", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks (also CAPTIONING_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_caption(sub)
    _add_evaluate(sub)
    _add_other(sub)
    _add_data_commands(sub)
    add_serve(sub)
    add_save(sub)
    add_shards(sub)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.debug or os.environ.get("CAPTIONING_DEBUG", "") not in ("", "0"):
        return args.func(args)
    try:
        return args.func(args)
    except (Interrupted, KeyboardInterrupt) as e:
        print(str(e) if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {_whose(e)}", file=sys.stderr)
        return 2
    except (EnvironmentProblem, FloatingPointError) as e:   # FloatingPointError: a NaN loss
        print(f"error: {_whose(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- the user gets one line; --debug gives the traceback
        print(f"error: {_whose(e)} ({type(e).__name__}; --debug shows the traceback)",
              file=sys.stderr)
        return 1


def _whose(error: BaseException) -> str:
    """The error's line; under torchrun with several processes led by the rank that met it, as
    `caption` across processes words it (`rank 1 of 2: ...`), so the job's output says which
    process stopped. A collective that lost its peer says so: that rank only saw another go."""
    message = str(error) or type(error).__name__
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        return message
    from .spread import Rank

    try:
        rank = Rank.from_env()
    except ValueError:              # RANK or WORLD_SIZE not torchrun's: no rank to name
        return message
    if re.match(rf"rank \d+ of {rank.world}\b", message):    # caption named the rank already
        return message
    if _lost_peer(error):
        message = ("another process of the job stopped answering (it failed, hung or its node "
                   "died: its own error line, or torchrun's summary on its node, names it; rerun "
                   f"the job with --resume auto to continue from last.pt): {message}")
    return f"{rank}: {message}"


def _lost_peer(error: BaseException) -> bool:
    """A collective (gloo, NCCL) or the process group's store failing on a peer that went away."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(error, getattr(dist, "DistError", ())):
        return True
    # gloo raises a plain RuntimeError, naming its transport ("gloo/transport/tcp/pair.cc: Read
    # error ...: Connection reset by peer") or, at its timeout, not ("Application timeout caused
    # pair closure")
    return isinstance(error, RuntimeError) and any(
        text in str(error) for text in ("gloo/transport", "caused pair closure"))
