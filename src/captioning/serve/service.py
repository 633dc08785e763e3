"""One captioning request, from an upload to the answer: the image opened (off the event loop, at
the model's input size, so that the queue holds small images), queued for the batcher, awaited
under the timeout; errors as RequestError with the CLI's one-line messages."""
from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..captioner import Captioner, CaptionResult
from ..data.images import ImageLoadError, describe
from .batcher import Batcher, QueueFull
from .inputs import Upload
from .metrics import Metrics
from .options import Options, RequestError, parse_options
from .settings import ServeSettings


class Service:
    """The model, its batcher and the server's settings: what every request needs."""

    def __init__(self, captioner: Captioner, settings: ServeSettings, metrics: Metrics,
                 info: dict):
        self.captioner, self.settings, self.metrics, self.info = captioner, settings, metrics, info
        self.batcher = Batcher(self._caption_batch, max_batch_size=settings.max_batch_size,
                               max_batch_delay_s=settings.max_batch_delay_ms / 1000,
                               max_queue=settings.max_queue, on_batch=metrics.batch,
                               warmup=self._warm_up)
        metrics.queue_depth.set_function(lambda: self.batcher.depth)

    def _caption_batch(self, images: list, keywords: dict) -> list[CaptionResult]:
        """The worker's call: the images are opened already, so the Captioner's own opening is a
        copy (one thread is enough)."""
        return list(self.captioner.caption_iter(images, batch_size=len(images), workers=1,
                                                **keywords))

    def _warm_up(self) -> None:
        """One image, then a full batch: the engine's buffers grow to the largest batch now, before
        /ready, not under the first load."""
        size = self.captioner.cfg.data.image_size
        image = Image.new("RGB", (size, size), "gray")
        self.captioner.caption([image])
        self.captioner.caption([image] * self.settings.max_batch_size,
                               batch_size=self.settings.max_batch_size)

    def refuse_if_full(self) -> None:
        """503 at once when the queue is full: before the body is even read."""
        if self.batcher.full():
            self.metrics.refused.labels("queue_full").inc()
            raise RequestError(503, "the server is busy: its queue is full (--max-queue "
                                    f"{self.settings.max_queue}); retry later",
                               {"Retry-After": str(self.batcher.retry_after_s())})

    def options(self, upload: Upload) -> Options:
        return parse_options(upload.options, self.captioner)

    async def caption(self, upload: Upload, options: Options, started: float) -> CaptionResult:
        """The upload's CaptionResult; RequestError for a bad image, a full queue, the timeout."""
        if isinstance(upload.source, str):
            self._check_url(upload.source)
        # the Captioner's own opening (open_image under its limits, then its resize)
        image = await run_in_threadpool(self.captioner._open, upload.source)
        if isinstance(image, ImageLoadError):
            self.metrics.images.labels("error").inc()
            raise RequestError(400, self._renamed(str(image), upload))
        try:
            job = self.batcher.submit(image, options.keywords, options.batch_key)
        except QueueFull as e:
            self.metrics.refused.labels("queue_full").inc()
            raise RequestError(503, str(e), {"Retry-After": str(e.retry_after_s)}) from None
        left = self.settings.timeout_s - (time.monotonic() - started)
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)),
                                            max(left, 0.001))
        except asyncio.TimeoutError:
            self.batcher.forget(job)
            self.metrics.refused.labels("timeout").inc()
            raise RequestError(504, f"no caption within --timeout {self.settings.timeout_s:g} s "
                                    f"(the server is busy): retry later") from None
        if not result.ok:                       # opened, yet the Captioner could not use it
            self.metrics.images.labels("error").inc()
            raise RequestError(400, self._renamed(result.error, upload))
        self.metrics.images.labels("captioned").inc()
        return result

    def _check_url(self, url: str) -> None:
        if not self.settings.allow_urls:
            raise RequestError(403, "this server does not fetch image URLs (start it with "
                                    "--allow-urls): send the image itself")
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise RequestError(422, f"{describe(url)}: only http(s) URLs are supported")

    @staticmethod
    def _renamed(message: str, upload: Upload) -> str:
        """The error names the upload as the user knows it, not as '<bytes: n>'."""
        if isinstance(upload.source, bytes):
            prefix = describe(upload.source)
            if message.startswith(prefix):
                return upload.name + message[len(prefix):]
        return message


def result_json(result: CaptionResult, name: str) -> dict:
    """POST /v1/caption's answer: the best caption, the n best with scores, and with attention the
    words and one map a word ({"shape": [h, w], "maps": words x h x w})."""
    out = {"input": name, "caption": result.caption, "captions": result.captions}
    if result.words is not None:
        out["words"] = result.words
        maps = np.asarray(result.attention, dtype=np.float64)
        out["attention"] = {"shape": list(maps.shape[1:]), "maps": np.round(maps, 6).tolist()}
    return out
