"""One handler a command: `handler(args) -> exit status`. Each imports what its command needs when
it runs, so `python -m captioning --help` and a command that needs no torch start fast."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import ConfigError

INTERRUPTED = 130          # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


class Interrupted(Exception):
    """Ctrl-C, with the one line that says where things stand and what to run next."""


def train(args) -> int:
    from ..config import load_config
    from ..train.run import resume, train, train_or_resume

    if args.resume and args.resume != "auto" and args.config:
        raise ConfigError(f"--resume {args.resume} continues that run with the config saved in it, "
                          f"so --config {args.config} would be ignored: drop --config (--set still "
                          "changes keys), or use --config FILE --resume auto to continue the "
                          "config's own run_dir")
    if not args.config and args.resume in (None, "auto"):
        raise ConfigError(f"train {'--resume auto ' if args.resume else ''}needs --config FILE "
                          "(e.g. configs/shapes.yaml), or --resume RUN_DIR to continue a run")
    # --resume auto: the paths are checked once it is known the run has not finished
    auto = args.resume == "auto"
    cfg = load_config(args.config, args.set, check_paths=not auto) if args.config else None
    run_dir = Path(args.resume if args.resume and args.resume != "auto" else cfg.run_dir)
    try:
        if cfg is None:
            resume(run_dir, args.set)
        elif args.resume == "auto":
            train_or_resume(cfg, args.set)
        else:
            train(cfg)
    except KeyboardInterrupt:
        last = run_dir / "last.pt"
        if last.is_file():
            raise Interrupted(f"interrupted: the last checkpoint is {last}; continue with: "
                              f"python -m captioning train --resume {run_dir}") from None
        raise Interrupted(f"interrupted before the first checkpoint of {run_dir}: "
                          f"nothing to resume; start again with --resume auto") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {run_dir}")
    return 0


def caption(args) -> int:
    from .caption import caption

    return caption(args)


def evaluate(args) -> int:
    from ..eval.evaluate import evaluate
    from .caption import decode_options

    report = evaluate(args.checkpoint, split=args.split, beam_size=args.beam, out=args.out,
                      device=args.device, precision=args.precision, overrides=args.set,
                      engine=args.engine, **decode_options(args))
    for key, value in report["metrics"].items():
        print(f"{key}: {value:.4f}" if isinstance(value, float)
              else f"{key}: {'n/a' if value is None else value}")
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def export(args) -> int:
    from ..decode.export import export

    meta = export(args.checkpoint, args.out, args.quantize, encoder=args.encoder,
                  calibration=args.calibration)
    check = meta["check"][args.quantize or "fp32"]
    kind = args.quantize or "fp32"
    if meta["int8"]:
        encoder = meta["int8"]["encoder"]
        kind += (f", the encoder int8 too (calibrated on {encoder['calibration_images']} images)"
                 if isinstance(encoder, dict) else ", the encoder fp32")
    print(f"exported {meta['checkpoint']} to {args.out} ({kind}): logits within "
          f"{check['relative']:.2g} of the checkpoint's (tolerance {check['tolerance']}); "
          f"caption with: python -m captioning caption --model {args.out} IMAGE ...")
    return 0


def extract_features(args) -> int:
    from ..config import load_config
    from ..data.corpus import read_corpus
    from ..train.features import extract_features

    cfg = load_config(args.config, args.set)
    corpus = read_corpus(cfg)
    try:
        cache = extract_features(cfg, sorted(corpus.captions), corpus.images_dir,
                                 cfg.data.features_dir, batch_size=args.batch_size,
                                 device=args.device, precision=cfg.train.precision,
                                 engine=args.engine)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the rows written so far are kept; "
                          "the same command goes on from there") from None
    engine = cache.meta.get("engine", {})
    print(f"{len(cache)} images, features {tuple(cache.shape[1:])} fp16 in {cache.folder}"
          + (f" (extracted by {engine['engine']}, {engine['precision']})" if engine else ""))
    return 0


def shapes(args) -> int:
    from ..data.shapes import build_shapes

    out = build_shapes(args.out_dir, args.images, seed=args.seed)
    print(f"wrote {args.images} images to {out}")
    return 0


def check_data(args) -> int:
    from ..config import load_config
    from ..data.check import check_data, format_report

    report = check_data(load_config(args.config, args.set), workers=args.workers, out=args.out)
    print(format_report(report))
    if not report["usable_images"]:
        print(f"error: no usable image left in {report['images_dir']} (every captioned image is "
              "missing or unreadable): check data.images and data.captions", file=sys.stderr)
        return 1
    if report.get("shard_problems"):
        print(f"error: {report['shard_problems'][0]} (write the shards again with `python -m "
              "captioning shards`)", file=sys.stderr)
        return 1
    return 0


def score(args) -> int:
    from ..eval.evaluate import format_scores, score

    report = score(args.predictions, args.references, fmt=args.format, split=args.split,
                   splits_file=args.splits, split_seed=args.split_seed, out=args.out,
                   key="--format")
    print(format_scores(report))
    for note in report["notes"]:
        if note not in report["warnings"]:      # the warnings were logged as they came
            print(f"note: {note}", file=sys.stderr)
    return 0

