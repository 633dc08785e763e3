"""What `serve`'s flags set: the server's limits, its batching and who may call it."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

API_KEY_ENV = "CAPTIONING_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    allow_urls: bool = False            # fetch {"url": ...} images (the server reaches the network)
    allow_private_urls: bool = False    # ... also on loopback, private and link-local addresses
    api_key: str | None = None          # set: inference needs `Authorization: Bearer <key>`
    max_batch_size: int = 8             # images captioned at once
    max_batch_delay_ms: float = 5.0     # how long the first request of a batch waits for others
    max_queue: int = 64                 # requests waiting beyond this: 503 + Retry-After
    timeout_s: float = 30.0             # a request not answered by then: 504
    max_upload_mb: float = 10.0         # a larger request body: 413, before it is read whole
    threads: int | None = None          # ONNX Runtime threads (--model); None: one a core

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:              # a host name: it may resolve anywhere
        return False
