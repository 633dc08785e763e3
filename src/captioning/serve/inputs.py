"""A request's image and options, from any of the shapes a client may send them in:

- the image's bytes as the body (`Content-Type: image/*` or application/octet-stream; `POST /` also
  takes no Content-Type), options in the query string;
- multipart/form-data: a file field `image` (or `file`), options as fields;
- JSON: {"image": base64 or a data: URL, or "url": "https://...", options...}, or Hugging Face's
  {"inputs": base64 or URL, "parameters": {options}}.

The body is read under the upload cap: a Content-Length over it is refused before anything is
read, a body that grows past it as soon as it does (413).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from .options import RequestError

RAW_TYPES = ("application/octet-stream",)


@dataclass
class Upload:
    source: bytes | str             # the image's bytes, or a URL
    name: str                       # how errors name it: a file name, the URL, "the request body"
    options: dict = field(default_factory=dict)     # API name -> raw value


async def read_body(request, max_bytes: int) -> bytes:
    too_big = RequestError(413, f"request body larger than --max-upload-mb "
                                f"({max_bytes / 2**20:g} MB)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def content_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_upload(request, max_bytes: int, *, raw_default: bool) -> Upload:
    """The request's image and options; `raw_default`: a body without Content-Type is the image."""
    kind = content_type(request)
    query = dict(request.query_params)
    if kind.startswith("image/") or kind in RAW_TYPES or (raw_default and not kind):
        body = await read_body(request, max_bytes)
        return Upload(body, "the request body", query)
    if kind == "multipart/form-data":
        upload = await _multipart(request, max_bytes)
    elif kind == "application/json":
        upload = _from_json(await read_body(request, max_bytes))
    else:
        raise RequestError(415, f"Content-Type {kind or 'none'!r} is not taken here: send the "
                                "image's bytes (image/*), multipart/form-data with a file field "
                                "'image', or JSON {\"image\": base64} or {\"url\": ...}")
    upload.options = query | upload.options
    return upload


async def _multipart(request, max_bytes: int) -> Upload:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await read_body(request, max_bytes)

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=2, max_fields=40).parse()
    except MultiPartException as e:
        raise RequestError(400, f"unreadable multipart form: {e.message}") from None
    files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    options = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    url = options.pop("url", "").strip()
    if len(files) > 1 or (files and url):
        raise RequestError(422, "one image per request: a single file field 'image' (or a url)")
    if url:
        return Upload(url, url, options)
    if not files:
        raise RequestError(422, "no image: send a file field named 'image'")
    upload = files[0][1]
    data = await upload.read()
    return Upload(data, upload.filename or "the uploaded file", options)


def _from_json(body: bytes) -> Upload:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise RequestError(422, "the JSON body must be an object: {\"image\": base64, ...}")
    options = dict(payload)
    if "inputs" in options:         # Hugging Face's shape: {"inputs": ..., "parameters": {...}}
        parameters = options.pop("parameters", None) or {}
        if not isinstance(parameters, dict):
            raise RequestError(422, "'parameters' must be an object of options")
        inputs = options.pop("inputs")
        is_url = isinstance(inputs, str) and inputs.lower().startswith(("http://", "https://"))
        options.update(parameters, **{"url" if is_url else "image": inputs})
    image, url = options.pop("image", None), options.pop("url", None)
    if (image is None) == (url is None):
        raise RequestError(422, "send one image: \"image\" (base64 or a data: URL) or \"url\"")
    if url is not None:
        if not isinstance(url, str):
            raise RequestError(422, "'url' must be a string")
        return Upload(url, url, options)
    return Upload(_base64(image), "the image in the request", options)


def _base64(text) -> bytes:
    if not isinstance(text, str):
        raise RequestError(422, "'image' must be a base64 string")
    if text.startswith("data:"):                # data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "'image' is not valid base64") from None
