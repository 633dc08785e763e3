"""One handler a command: `handler(args) -> exit status`. Each imports what its command needs when
it runs, so `python -m captioning --help` and a command that needs no torch start fast."""
from __future__ import annotations

import json
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
    from tqdm.auto import tqdm

    from ..captioner import Captioner
    from ..data.images import expand_inputs, redact

    out = _results_file(args)
    inputs = expand_inputs(args.inputs)
    todo = [x for x in inputs if out is None or redact(x) not in out.done]
    if out is not None:
        _say_skipped(out, len(inputs) - len(todo), args.retry_errors)
    if args.model:
        from ..captioner.folder import folder_kind

        export = folder_kind(Path(args.model).expanduser()) == "export"
        if export and (args.device not in (None, "cpu") or args.precision != "auto"):
            raise ConfigError(f"--model {args.model} is an export: it runs on the CPU in its own "
                              "precision: drop --device and --precision (or caption with "
                              "--checkpoint or a model folder)")
        captioner = Captioner.from_pretrained(args.model, device=args.device,
                                              precision=args.precision, engine=args.engine)
    else:
        captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device,
                                              precision=args.precision, engine=args.engine)
    failed = False
    bar = tqdm(total=len(inputs), initial=len(inputs) - len(todo), desc="captioning", unit="img",
               file=sys.stderr, disable=len(inputs) < 2 * args.batch_size and not out)
    try:
        results = captioner.caption_iter(todo, beam_size=args.beam, batch_size=args.batch_size,
                                         **_decode_options(args))
        for source, r in zip(todo, results):
            failed |= not r.ok
            _show(r, args, out, inputs.index(source) if args.attention else 0, source)
            bar.update()
    finally:
        bar.close()
        if out is not None:
            out.close()
    return 1 if failed else 0


def _results_file(args):
    """caption --out: the results file, told which model makes this run's rows."""
    from ..captioner.folder import is_hub_id, resolve_folder
    from .results import ResultsFile, model_identity

    if not args.out:
        if args.redo or args.retry_errors:
            raise ConfigError(f"--{'redo' if args.redo else 'retry-errors'} works on a results "
                              "file: add --out FILE")
        return None
    source = Path(args.model or args.checkpoint)
    if args.model and is_hub_id(args.model):
        source = resolve_folder(args.model)         # the snapshot (the hub's cache: once)
    if not args.model and source.is_dir():
        source = source / "best.pt"                 # a run directory: its best.pt, as the loader
    if not source.exists():
        raise FileNotFoundError(f"{'--model' if args.model else '--checkpoint'} {source} does "
                                "not exist")
    model = model_identity(source)
    return ResultsFile(args.out, retry_errors=args.retry_errors, model=model, redo=args.redo)


def _say_skipped(out, skipped: int, retry_errors: bool) -> None:
    """Always one line: how many inputs the file already holds (and what --redo took out)."""
    retry = "" if retry_errors or not out.failed else \
        f"; {len(out.failed)} of them failed: --retry-errors captions those again"
    redone = f"; {out.redone} row(s) of another model taken out (--redo)" if out.redone else ""
    legacy = f"; {out.unrecorded} of them from an earlier version, which named no model" \
        if out.unrecorded else ""
    print(f"{skipped} input(s) already in {out.path}: skipped{retry}{legacy}{redone}; "
          f"this run's model: {out.model}", file=sys.stderr)


def _show(r, args, out, n: int, source: str) -> None:
    """One result: to --out, to stdout (a JSON line or `input<TAB>caption` lines), errors to stderr.
    `n`: the input's place among all the inputs (its attention PNG's number)."""
    if args.attention and r.ok:
        _draw_attention(r, n, Path(args.attention))
    if out is not None:
        out.write(r, source)
        if not r.ok:
            print(f"error: {r.error}", file=sys.stderr, flush=True)
    elif args.json:
        print(json.dumps(r.to_dict()), flush=True)
    elif r.ok:
        print("\n".join(f"{r.input}\t{c['caption']}" for c in r.captions), flush=True)
    else:
        print(f"error: {r.error}", file=sys.stderr, flush=True)


def evaluate(args) -> int:
    from ..eval.evaluate import evaluate

    report = evaluate(args.checkpoint, split=args.split, beam_size=args.beam, out=args.out,
                      device=args.device, precision=args.precision, overrides=args.set,
                      engine=args.engine, **_decode_options(args))
    for key, value in report["metrics"].items():
        print(f"{key}: {value:.4f}" if isinstance(value, float)
              else f"{key}: {'n/a' if value is None else value}")
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _decode_options(args) -> dict:
    """The decoding flags as Captioner.caption's keyword arguments (DecodeOptions)."""
    keys = ("num_captions", "max_words", "length_penalty", "temperature", "top_k", "top_p", "seed",
            "no_repeat_ngram_size", "min_words", "allow_function_word_end", "attention_layer",
            "attention_head")
    options = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "attention", None):
        options["attention"] = True
    return options


def _draw_attention(result, n: int, folder: Path) -> None:
    from ..eval.plots import show_attention

    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(result.input).stem)[:60]
    fig = show_attention(result.image, result.words, result.attention)
    fig.savefig(folder / f"{n:04d}_{stem}.png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)


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

