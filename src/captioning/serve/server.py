"""uvicorn around the app. SIGTERM (or Ctrl-C): uvicorn stops accepting connections and waits for
the requests in flight, the batcher captions what is queued, then `serve` returns 0."""
from __future__ import annotations

import ctypes
import ctypes.util
import signal
import threading

import uvicorn

from ..captioner import Captioner
from .app import build_app
from .settings import ServeSettings


def server(captioner: Captioner, settings: ServeSettings, info: dict | None = None, *,
           log_level: str = "info") -> uvicorn.Server:
    """The uvicorn server of the app, not yet started (tests run it on a thread)."""
    config = uvicorn.Config(build_app(captioner, settings, info), host=settings.host,
                            port=settings.port, log_level=log_level,
                            access_log=log_level in ("debug", "trace", "info"),
                            timeout_graceful_shutdown=None, server_header=False)
    return uvicorn.Server(config)


M_ARENA_MAX = -8      # glibc's mallopt parameter (malloc.h)


def few_malloc_arenas(arenas: int = 2) -> bool:
    """glibc gives each thread that allocates its own malloc arena (up to 8 a core), and an arena
    keeps what it freed: the threads that read uploads made the server's RSS grow by 13-19% from
    its 200th request to its 2000th (benchmarks/serve.py, reference size; 6% with 2 arenas). True
    where set."""
    name = ctypes.util.find_library("c")
    try:
        return bool(name) and ctypes.CDLL(name).mallopt(M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):      # not glibc (macOS, musl): nothing to set
        return False


def run(captioner: Captioner, settings: ServeSettings, info: dict | None = None, *,
        log_level: str = "info") -> int:
    """Serve until SIGTERM or Ctrl-C; 0 once every request in flight was answered."""
    few_malloc_arenas()
    srv = server(captioner, settings, info, log_level=log_level)
    if threading.current_thread() is threading.main_thread():
        # uvicorn raises the signal that stopped it again once it has stopped, so that the default
        # handler kills the process; it stopped cleanly, on purpose: that is exit status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    srv.run()
    return 0
