"""The HTTP app: routes, the API key, and every error as JSON {"error": one line}.

POST /            Hugging Face's image-to-text: the image's bytes -> [{"generated_text": ...}]
POST /v1/caption  multipart or JSON with decoding options -> captions, scores, words, attention
GET  /            the page (Accept: text/html), else what the server is
GET  /health /ready /metrics /v1/info, and FastAPI's /docs and /openapi.json
"""
from __future__ import annotations

import contextlib
import hmac
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..captioner import Captioner
from .inputs import read_upload
from .metrics import CountRequests, Metrics
from .options import MAX_BEAM, MAX_CAPTIONS, OPTIONS, RequestError
from .service import Service, result_json
from .settings import ServeSettings

STATIC = {"page.css": "text/css", "page.js": "text/javascript"}
# the page loads nothing from another host; the images it shows are the user's own (blob:), or
# with --allow-urls the URL they typed
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:{urls}; style-src 'self'; "
               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
IMAGE_BODY = {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
              "required": True}
CAPTION_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"}, "url": {"type": "string"},
        **{name: {"type": "string"} for name in OPTIONS}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "description": "base64, or a data: URL"},
        "url": {"type": "string", "description": "with --allow-urls"},
        **{name: {"type": "boolean" if name == "attention" else "number"} for name in OPTIONS}}}}}}


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(captioner: Captioner, settings: ServeSettings, info: dict | None = None) -> FastAPI:
    """The app over a loaded Captioner; its batcher starts and stops with the app's lifespan."""
    metrics = Metrics()
    service = Service(captioner, settings, metrics, info or {})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.close()         # the requests in flight were answered: uvicorn waited

    app = FastAPI(title="captioning", summary="An image captioner over HTTP", lifespan=lifespan,
                  version="0.1.0")
    app.state.service = service
    _errors(app)
    _inference_routes(app, service)
    _other_routes(app, service)
    app.add_middleware(CountRequests, metrics=metrics)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        return error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', e)}")

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        return error(500, f"internal error: {e or type(e).__name__} ({type(e).__name__})")


def _authorize(request: Request, settings: ServeSettings) -> None:
    if not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                            settings.api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send the header "
                                "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})


def _inference_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings

    async def caption(request: Request, *, raw_default: bool):
        started = time.monotonic()
        _authorize(request, settings)
        service.refuse_if_full()
        upload = await read_upload(request, settings.max_upload_bytes, raw_default=raw_default)
        options = service.options(upload)
        return upload, await service.caption(upload, options, started)

    @app.post("/", summary="Hugging Face image-to-text: the image's bytes -> generated_text",
              openapi_extra={"requestBody": IMAGE_BODY})
    async def image_to_text(request: Request):
        _, result = await caption(request, raw_default=True)
        return [{"generated_text": c["caption"]} for c in result.captions]

    @app.post("/v1/caption", summary="Caption one image, with the CLI's decoding options",
              openapi_extra={"requestBody": CAPTION_BODY})
    async def caption_v1(request: Request):
        upload, result = await caption(request, raw_default=False)
        return result_json(result, upload.name)


def _other_routes(app: FastAPI, service: Service) -> None:
    batcher, settings = service.batcher, service.settings

    @app.get("/", summary="The web page (Accept: text/html), else what this server is")
    async def home(request: Request):
        if "text/html" in request.headers.get("accept", ""):
            page = resources.files(__package__).joinpath("static/index.html").read_bytes()
            return Response(page, media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_POLICY.format(
                                urls=" http: https:" if settings.allow_urls else "")})
        return {"service": "captioning", "page": "GET / with Accept: text/html",
                "api": ["POST /", "POST /v1/caption"], "docs": "/docs", **info()}

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise RequestError(404, f"no such file: {name}")
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    def info() -> dict:
        return {"model": service.info, "allow_urls": settings.allow_urls,
                "api_key_required": bool(settings.api_key),
                "max_upload_mb": settings.max_upload_mb, "max_beam": MAX_BEAM,
                "max_captions": MAX_CAPTIONS, "options": list(OPTIONS)}

    app.get("/v1/info", summary="The model, the limits and the options")(info)

    @app.get("/health", summary="Alive")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Model loaded and warmed up (503 until then)")
    async def ready():
        if not batcher.ready.is_set():
            return error(503, "warming up", {"Retry-After": "1"})
        return {"status": "ready", "queue": batcher.depth}

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics():
        return Response(service.metrics.text(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")
