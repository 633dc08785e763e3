"""`python -m captioning serve`: its parser and its handler (the app itself is captioning.serve).

Nothing here imports FastAPI or torch until the command runs: `--help` stays fast, and without the
`[serve]` extra the command says what to install."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ..config import ConfigError, EnvironmentProblem
from ..serve.settings import API_KEY_ENV, ServeSettings, is_loopback

SERVE_EXTRA = ("fastapi", "uvicorn", "multipart", "prometheus_client")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value
    return parse


def add_serve(sub) -> None:
    d = ServeSettings()
    p = sub.add_parser("serve", help="serve a model over HTTP: an API and a web page",
                       description="Serve a model over HTTP (FastAPI + uvicorn): POST / (Hugging "
                                   "Face image-to-text), POST /v1/caption, a web page at GET /, "
                                   "/health, /ready, /metrics. Needs pip install -e '.[serve]'. "
                                   "docs/serving.md has the API and the options.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a checkpoint file (a run directory means its best.pt)")
    model.add_argument("--model", metavar="DIR|USER/NAME",
                       help="a model folder `save` wrote (or its hub id), or a folder `export` "
                            "wrote")
    p.add_argument("--host", default=d.host,
                   help="address to bind (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, default=d.port, help=f"default {d.port}")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}); "
                        "needed when binding beyond loopback")
    p.add_argument("--allow-urls", action="store_true",
                   help="fetch images from http(s) URLs that requests name")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="with --allow-urls: also loopback, private and link-local addresses")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=_positive(int), default=d.max_batch_size,
                   help=f"images captioned at once (default {d.max_batch_size})")
    g.add_argument("--max-batch-delay-ms", type=float, default=d.max_batch_delay_ms,
                   help="how long a request waits for others to share its batch "
                        f"(default {d.max_batch_delay_ms:g})")
    g.add_argument("--max-queue", type=_positive(int), default=d.max_queue,
                   help=f"requests waiting beyond this get 503 (default {d.max_queue})")
    g.add_argument("--timeout", type=_positive(float), default=d.timeout_s, metavar="SECONDS",
                   help=f"a request not answered by then gets 504 (default {d.timeout_s:g})")
    g.add_argument("--max-upload-mb", type=_positive(float), default=d.max_upload_mb,
                   help=f"larger request bodies get 413 (default {d.max_upload_mb:g})")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="with --model: ONNX Runtime threads (default: one a core)")
    p.add_argument("--device", default=None,
                   help="with --checkpoint: cpu, cuda or cuda:N (default: cuda when visible)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's (info logs every request)")
    p.set_defaults(func=serve)


def settings_from(args) -> ServeSettings:
    """The flags as ServeSettings, after the checks that need no model."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise ConfigError(f"--host {args.host} lets other machines call this server: give it an "
                          f"API key (--api-key KEY or ${API_KEY_ENV}), or keep the default "
                          "--host 127.0.0.1")
    if args.allow_private_urls and not args.allow_urls:
        raise ConfigError("--allow-private-urls widens --allow-urls: add --allow-urls")
    if args.max_batch_delay_ms < 0:
        raise ConfigError(f"--max-batch-delay-ms {args.max_batch_delay_ms:g}: must be >= 0")
    return ServeSettings(host=args.host, port=args.port, allow_urls=args.allow_urls,
                         allow_private_urls=args.allow_private_urls, api_key=api_key,
                         max_batch_size=args.max_batch_size,
                         max_batch_delay_ms=args.max_batch_delay_ms, max_queue=args.max_queue,
                         timeout_s=args.timeout, max_upload_mb=args.max_upload_mb,
                         threads=args.threads)


def serve(args) -> int:
    missing = [m for m in SERVE_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentProblem(f"serve needs {', '.join(missing)}: pip install -e \".[serve]\"")
    settings = settings_from(args)
    from ..data.images import ImageLimits
    from ..serve.heap import tune_malloc
    from ..serve.load import describe_model, load
    from ..serve.server import run

    tune_malloc()                   # before the model loads, so that its buffers follow it too
    limits = ImageLimits(max_bytes=settings.max_upload_bytes,
                         allow_private_urls=settings.allow_private_urls)
    captioner = load(checkpoint=args.checkpoint, model=args.model, limits=limits,
                     device=args.device, threads=settings.threads)
    print(f"serving {args.model or args.checkpoint} on http://{settings.host}:{settings.port}/ "
          f"(the page: open it in a browser; API docs: /docs)", file=sys.stderr, flush=True)
    return run(captioner, settings, describe_model(captioner, args.model or args.checkpoint),
               log_level=args.log_level)
