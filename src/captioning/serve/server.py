"""uvicorn around the app. SIGTERM (or Ctrl-C): uvicorn stops accepting connections and waits for
the requests in flight, the batcher captions what is queued, then `serve` returns 0."""
from __future__ import annotations

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


def run(captioner: Captioner, settings: ServeSettings, info: dict | None = None, *,
        log_level: str = "info") -> int:
    """Serve until SIGTERM or Ctrl-C; 0 once every request in flight was answered."""
    srv = server(captioner, settings, info, log_level=log_level)
    if threading.current_thread() is threading.main_thread():
        # uvicorn raises the signal that stopped it again once it has stopped, so that the default
        # handler kills the process; it stopped cleanly, on purpose: that is exit status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    srv.run()
    return 0
