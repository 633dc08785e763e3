"""python -m captioning <command>: argument parsing only; the work is in the package."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ConfigError


def _train(args) -> int:
    from .config import load_config
    from .train import fit

    if args.resume:
        run_dir = fit(None, resume=args.resume, overrides=args.set)
    else:
        if not args.config:
            raise ConfigError("train needs --config FILE (or --resume RUN_DIR)")
        run_dir = fit(load_config(args.config, args.set))
    print(f"run directory: {run_dir}")
    return 0


def _caption(args) -> int:
    from .captioner import Captioner

    captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
    results = captioner.caption(args.inputs, beam_size=args.beam, batch_size=args.batch_size)
    for r in results:
        if args.json:
            print(json.dumps(r.to_dict()), flush=True)
        elif r.ok:
            print(f"{r.input}\t{r.caption}", flush=True)
        else:
            print(f"error: {r.error}", file=sys.stderr, flush=True)
    return 0 if all(r.ok for r in results) else 1


def _evaluate(args) -> int:
    from .evaluate import evaluate

    report = evaluate(args.checkpoint, split=args.split, beam_size=args.beam, out=args.out,
                      device=args.device, precision=args.precision)
    for key, value in report["metrics"].items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {'n/a' if value is None else value}")
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _extract_features(args) -> int:
    from .config import load_config
    from .data import read_corpus
    from .features import extract_features

    cfg = load_config(args.config, args.set)
    corpus = read_corpus(cfg)
    cache = extract_features(cfg, sorted(corpus.captions), corpus.images_dir, cfg.data.features_dir,
                             batch_size=args.batch_size, device=args.device, precision=cfg.train.precision)
    print(f"{len(cache)} images, features {tuple(cache.shape[1:])} fp16 in {cache.folder}")
    return 0


def _shapes(args) -> int:
    from .shapes import build_shapes

    out = build_shapes(args.out_dir, args.images, seed=args.seed)
    print(f"wrote {args.images} images to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captioning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", help="YAML config, e.g. configs/shapes.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.set_defaults(func=_train)

    p = sub.add_parser("caption", help="caption images given as paths or http(s) URLs")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--json", action="store_true", help="one JSON object a line per input, in input order")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("inputs", nargs="+", metavar="PATH_OR_URL")
    p.set_defaults(func=_caption)

    p = sub.add_parser("evaluate", help="score a checkpoint on a held-out split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--out", help="write metrics, predictions and references to this JSON file")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("extract-features", help="cache the frozen encoder's features of every image (fp16)")
    p.add_argument("--config", required=True, help="the training config (its model.backbone, data.*)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_extract_features)

    p = sub.add_parser("shapes", help="generate the synthetic Shapes data set (Kaggle Flickr30k layout)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_shapes)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # train.NonFiniteLossError: the run stopped, nothing broken was saved
        print(f"error: {e}", file=sys.stderr)
        return 1
