"""`caption`: images in, captions out (stdout, --json, --out FILE); with torchrun, one rank of a job
that spreads the inputs over processes (spread.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import ConfigError, EnvironmentProblem


def caption(args) -> int:
    from tqdm.auto import tqdm

    from ..data.images import redact
    from .inputs import Shard, expand, sources
    from .spread import Rank, parts_folder

    rank = Rank.from_env()
    if rank.world > 1 or (args.out and parts_folder(Path(args.out)).is_dir()):
        return _caption_in_parts(args, rank)
    out = _results_file(args)
    inputs = expand(args.inputs)
    done = out.done if out is not None else set()
    todo = [x for x in inputs if isinstance(x, Shard) or redact(x) not in done]
    if out is not None:
        _say_skipped(out, len(inputs) - len(todo), args.retry_errors)
    captioner = _captioner(args)
    shards = any(isinstance(x, Shard) for x in inputs)
    bar = tqdm(total=None if shards else len(inputs), initial=len(inputs) - len(todo),
               desc="captioning", unit="img", file=sys.stderr,
               disable=len(inputs) < 2 * args.batch_size and not out and not shards)
    try:
        failed = _caption_into(captioner, sources(todo, done), inputs, args, out, bar)
    finally:
        bar.close()
        if out is not None:
            out.close()
    return 1 if failed else 0


def _caption_into(captioner, pairs, inputs: list, args, out, bar) -> bool:
    """Caption sources.inputs' (name, source) pairs and show each result as it comes; whether any
    failed. A shard's samples go to the captioner a few batches at a time (their bytes)."""
    from ..captioner import CaptionResult

    failed, places = False, {x: i for i, x in enumerate(inputs)} if args.attention else {}
    for chunk in _chunks(pairs, 8 * args.batch_size):
        todo = [source for _, source in chunk if not isinstance(source, Exception)]
        results = captioner.caption_iter(todo, beam_size=args.beam, batch_size=args.batch_size,
                                         **decode_options(args))
        for name, source in chunk:
            r = CaptionResult(name, error=str(source)) if isinstance(source, Exception) \
                else next(results)
            if not isinstance(source, str):
                r.input = name          # a shard's sample: SHARD#KEY, not <bytes: n>
            failed |= not r.ok
            _show(r, args, out, places.get(name, 0), name)
            bar.update()
    return failed


def _chunks(pairs, most: int):
    """Lists of pairs holding at most `most` images read into memory (a name costs nothing)."""
    chunk, held = [], 0
    for name, source in pairs:
        chunk.append((name, source))
        held += not isinstance(source, (str, Exception))
        if held >= most:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


def _captioner(args, rank=None):
    """The Captioner of --checkpoint or --model; `rank` (one of several processes): on its GPU,
    else on its share of the cores (spread.Rank.threads), the checkpoint's export made once."""
    from ..captioner import Captioner
    from ..captioner.folder import folder_kind

    export = bool(args.model) and folder_kind(Path(args.model).expanduser()) == "export"
    threads, device = None, args.device
    if rank is not None and rank.world > 1:     # (an export runs on the CPU: no GPU looked for)
        device = device if export else _rank_device(args.device, rank)
        threads = rank.threads()
    if args.model:
        if export and (args.device not in (None, "cpu") or args.precision != "auto"):
            raise ConfigError(f"--model {args.model} is an export: it runs on the CPU in its own "
                              "precision: drop --device and --precision (or caption with "
                              "--checkpoint or a model folder)")
        captioner = Captioner.from_pretrained(args.model, device=device, precision=args.precision,
                                              engine=args.engine, threads=threads)
    elif threads is not None:
        captioner = _rank_checkpoint_captioner(args, device, threads)
    else:
        captioner = Captioner.from_checkpoint(args.checkpoint, device=device,
                                              precision=args.precision, engine=args.engine)
    if threads is not None and captioner.model is not None and str(captioner.device) == "cpu":
        import torch

        torch.set_num_threads(threads)
    return captioner


def _rank_device(device, rank) -> str | None:
    """A rank's device: the GPU of its local rank where --device is unset or plain cuda."""
    from ..captioner.engines import gpu_visible

    if device == "cuda" or (device is None and gpu_visible()):
        return f"cuda:{rank.local_rank}"
    return device


def _rank_checkpoint_captioner(args, device, threads: int):
    """from_checkpoint for one rank of several: the export cache is filled by one rank at a time
    (the first makes it, the others load it), and ONNX Runtime gets `threads`."""
    from ..captioner import Captioner
    from ..captioner.engines import cached_export, choose_engine
    from ..files import exclusive
    from .spread import parts_folder

    if choose_engine(args.engine, device, args.precision) == "onnx":
        with exclusive(parts_folder(Path(args.out)) / ".export.lock"):
            folder = cached_export(args.checkpoint)
        if folder is not None:
            return Captioner.from_export(folder, threads=threads)
    return Captioner.from_checkpoint(args.checkpoint, device=device, precision=args.precision,
                                     engine=args.engine)


def _caption_in_parts(args, rank) -> int:
    """One rank of `torchrun ... caption --out FILE` (spread.py): its share into its part; rank 0
    then waits for the others and merges the parts into FILE. Any rank's error names the rank."""
    from . import spread

    if not args.out:
        raise ConfigError(f"caption across {rank.world} processes needs --out FILE.jsonl|.csv: "
                          "each rank writes its part, and rank 0 merges them into FILE")
    out = Path(args.out)
    _results_file(args, check_only=True)
    try:
        with spread.running(out, rank):
            inputs, model, digest = _caption_part(args, rank, out)
        if rank.rank != 0:
            return 0
        spread.wait_for_ranks(out, rank, digest)
        rows = spread.merge(out, inputs, model)
    except spread.RankFailed:
        raise
    except Exception as e:
        raise _with_rank(e, rank) from None
    failed = sum(1 for row in rows if row.get("error"))
    print(f"{len(rows)} input(s) in {out}, merged from {rank.world} process(es)"
          + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _caption_part(args, rank, out: Path) -> tuple[list[str], str, str]:
    """Rank `rank`'s share of the inputs, captioned into its part; its .done mark once finished.
    Returns this run's inputs (as rows name them), the model and the job's digest."""
    from tqdm.auto import tqdm

    from ..data.images import redact
    from . import spread
    from .inputs import Shard, expand, sources
    from .results import ResultsFile

    inputs = expand(args.inputs)
    names = [redact(x) for x in inputs]
    model = _model_identity(args)
    mine = spread.part_file(out, rank)
    part = ResultsFile(mine, retry_errors=args.retry_errors, model=model, redo=args.redo)
    try:
        done = part.done | spread.done_elsewhere(out, mine, model, args.retry_errors, args.redo)
        share = rank.share(inputs)
        todo = [x for x in share if isinstance(x, Shard) or redact(x) not in done]
        if rank.rank == 0:
            print(f"{rank.world} process(es), {len(inputs)} input(s): "
                  f"{len(inputs) - len(set(names) - done)} already done", file=sys.stderr)
        captioner = _captioner(args, rank) if todo else None
        shards = any(isinstance(x, Shard) for x in share)
        bar = tqdm(total=None if shards else len(share), initial=len(share) - len(todo),
                   desc=f"rank {rank.rank}", unit="img", file=sys.stderr,
                   disable=rank.rank != 0 or not todo)
        with bar:
            if todo:
                pairs = sources(todo, done, lambda shard, keys: spread.record_shard(out, shard,
                                                                                    keys))
                _caption_into(captioner, pairs, inputs, args, part, bar)
    finally:
        part.close()
    digest = spread.job_digest(names, model, (args.retry_errors, args.redo))
    spread.mark_done(out, rank, digest, len(todo))
    return inputs, model, digest


def _with_rank(error: Exception, rank) -> Exception:
    """`error`, its message led by the rank that met it (the one line the job ends with)."""
    message = f"{rank}: {error}"
    if isinstance(error, (ConfigError, ValueError, FileNotFoundError, FileExistsError)):
        try:
            return type(error)(message)
        except TypeError:
            pass
    return EnvironmentProblem(message)


def _model_identity(args) -> str:
    """caption --out: what makes this run's rows (results.model_identity of the model's file)."""
    from ..captioner.folder import is_hub_id, resolve_folder
    from .results import model_identity

    source = Path(args.model or args.checkpoint)
    if args.model and is_hub_id(args.model):
        source = resolve_folder(args.model)         # the snapshot (the hub's cache: once)
    if not args.model and source.is_dir():
        source = source / "best.pt"                 # a run directory: its best.pt, as the loader
    if not source.exists():
        raise FileNotFoundError(f"{'--model' if args.model else '--checkpoint'} {source} does "
                                "not exist")
    return model_identity(source)


def _results_file(args, check_only: bool = False):
    """caption --out: the results file, told which model makes this run's rows (`check_only`:
    the flags and the file's name checked, nothing opened)."""
    from .results import ResultsFile

    if not args.out:
        if args.redo or args.retry_errors:
            raise ConfigError(f"--{'redo' if args.redo else 'retry-errors'} works on a results "
                              "file: add --out FILE")
        return None
    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"--out {out}: expected a .jsonl or .csv file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    if check_only:
        return None
    return ResultsFile(out, retry_errors=args.retry_errors, model=_model_identity(args),
                       redo=args.redo)


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


def decode_options(args) -> dict:
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
