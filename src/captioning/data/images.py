"""Open an image from a path, URL, bytes or PIL image, safely, as an RGB PIL image.

Every bad input -- missing file, non-image, truncated data, decompression bomb,
HTTP error, slow or endless server -- raises `ImageLoadError`, whose message
starts with `describe(source)`, so a caller catches one exception type and can
log or report the failing input as is.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from .url_safety import AddressPolicy, AddressRefused, checked_session

USER_AGENT = "captioning/0.1"
# Pillow reads many more formats; EPS would even run Ghostscript on the input.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
CHUNK = 64 * 1024


class ImageLoadError(Exception):
    """An input that cannot be opened as an image; the message is '<input>: <reason>'."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what one `open_image` call may read, decode and wait for.

    A URL fetch checks `deadline` whenever data arrives and caps every
    connect and read wait at the time left, so it ends at most `read_timeout`
    after the deadline (one blocked read); DNS lookups are not bounded.
    """

    max_bytes: int = 50 * 2**20        # encoded size, counted while reading (not Content-Length)
    max_pixels: int = 90_000_000       # width * height, checked from the header before decoding
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 30.0             # whole URL fetch; a trickling server never hits read_timeout
    max_redirects: int = 5
    # the addresses a URL may reach, checked at every hop on the address connected to
    # (url_safety.AddressPolicy): None any the user named, but no redirect from a public address
    # to a loopback, private or link-local one; False public ones only (serve); True any
    allow_private_urls: bool | None = None


def redact(name):
    """A URL without the user name and password it may carry (`http://user:secret@host/x.jpg`):
    nothing printed or written shows them. Anything else as it is."""
    if isinstance(name, str) and "@" in name and _is_url(name):
        parts = urllib.parse.urlsplit(name)
        if parts.username is not None or parts.password is not None:
            return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return name


def describe(source) -> str:
    """A short printable name for `source`, used in error messages and reports."""
    if isinstance(source, Image.Image):
        return f"<PIL.Image {source.width}x{source.height} {source.mode}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes: {memoryview(source).nbytes}>"
    if isinstance(source, (str, os.PathLike)):
        name = redact(os.fsdecode(source))
        return name if len(name) <= 200 else name[:197] + "..."
    return f"<{type(source).__name__}>"


def open_image(source, limits: ImageLimits | None = None) -> Image.Image:
    """Open `source` as a fully loaded RGB image with its EXIF orientation applied.

    `source` is a path (str or os.PathLike, `~` expanded), an http(s) URL
    string, encoded bytes (bytes, bytearray or memoryview) or a PIL image
    (never modified; a new image is returned). Transparent pixels are
    composited onto white.
    """
    limits = limits or ImageLimits()
    name = describe(source)
    if isinstance(source, Image.Image):
        return _to_rgb(source, name, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if memoryview(source).nbytes > limits.max_bytes:
            raise ImageLoadError(f"{name}: larger than max_bytes={limits.max_bytes}")
        data = bytes(source)
    elif isinstance(source, str) and _is_url(source):
        data = _fetch(source, name, limits)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(source, name, limits)
    else:
        raise ImageLoadError(f"{name}: unsupported source type "
                             "(expected a path, URL, bytes or PIL image)")
    return _decode(data, name, limits)


def _is_url(text: str) -> bool:
    # Any 'scheme:' prefix counts, so 'file://' or 'javascript:' is refused rather than
    # read as a relative path; one letter is a Windows drive ('C:'), and an existing
    # file whose name merely contains a colon is still a path.
    if re.match(r"https?://", text, re.IGNORECASE):
        return True
    return bool(re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+:", text)) and not os.path.exists(text)


def _read_file(path, name: str, limits: ImageLimits) -> bytes:
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):      # expand_inputs keeps a folder it found no image in
        raise ImageLoadError(f"{name}: no images in this folder (looked for "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))}, in its subfolders too)")
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageLoadError(f"{name}: cannot read file ({e.strerror or e})") from None
    if len(data) > limits.max_bytes:
        raise ImageLoadError(f"{name}: file larger than max_bytes={limits.max_bytes}")
    return data


def _fetch(url: str, name: str, limits: ImageLimits) -> bytes:
    """Download `url` under the byte cap, the deadline and the redirect limit."""
    start = time.monotonic()

    def seconds_left() -> float:
        """Time left before the deadline; raises once it has passed."""
        left = limits.deadline - (time.monotonic() - start)
        if left <= 0:
            raise ImageLoadError(f"{name}: download exceeded the {limits.deadline:g} s deadline")
        return left

    policy = AddressPolicy(limits.allow_private_urls)
    try:
        with checked_session(policy) as session:
            session.headers["User-Agent"] = USER_AGENT
            # Redirects are followed by hand so every hop is scheme- and address-checked and
            # its timeouts are cut to the time left before the deadline.
            hop = url
            for policy.hop in range(limits.max_redirects + 1):    # the policy knows the hop
                redirected = "" if hop == url else f" (redirected to {describe(hop)})"
                if urlsplit(hop).scheme.lower() not in ("http", "https"):
                    raise ImageLoadError(f"{name}: only http(s) URLs are supported{redirected}")
                left = seconds_left()
                timeout = (min(limits.connect_timeout, left), min(limits.read_timeout, left))
                try:
                    response = session.get(hop, stream=True, timeout=timeout,
                                           allow_redirects=False)
                except AddressRefused as e:
                    raise ImageLoadError(f"{name}: {e}{redirected}") from None
                target = session.get_redirect_target(response)
                if target is None:
                    break
                response.close()
                hop = urljoin(response.url, target)
            else:
                raise ImageLoadError(f"{name}: more than {limits.max_redirects} redirects")
            with response:
                where = "" if hop == url else f" (at {describe(hop)})"
                if response.status_code >= 400:
                    status = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
                    raise ImageLoadError(f"{name}: {status}{where}")
                body = _read_body(response, name + where, limits, seconds_left)
                _refuse_html(body, response, name + where)
                return body
    except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError) as e:
        raise ImageLoadError(f"{name}: timed out ({_root_cause(e)})") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise ImageLoadError(f"{name}: download failed ({_root_cause(e)})") from None


def _read_body(response: requests.Response, name: str, limits: ImageLimits, seconds_left) -> bytes:
    too_big = f"{name}: response larger than max_bytes={limits.max_bytes}"
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise ImageLoadError(too_big)  # an early refusal; the count below is what actually holds
    chunks, received = [], 0
    while received <= limits.max_bytes:
        seconds_left()
        # read1 returns what one socket read delivers; read(n) waits for n bytes,
        # so a server trickling a byte a second would never reach the check above.
        chunk = response.raw.read1(min(CHUNK, limits.max_bytes + 1 - received), decode_content=True)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        received += len(chunk)
    raise ImageLoadError(too_big)


def _refuse_html(body: bytes, response: requests.Response, name: str) -> None:
    """A web page where an image was expected (a login wall, a gallery, an error page served as
    200): say so, with its content type and status, not only that the bytes are not an image."""
    kind = response.headers.get("Content-Type", "")
    start = body[:512].lstrip().lower()
    if kind.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml") or \
            start.startswith((b"<!doctype html", b"<html")):
        try:
            Image.open(io.BytesIO(body), formats=FORMATS)   # an image labelled text/html
            return
        except Exception:
            pass
        raise ImageLoadError(f"{name}: the server returned an HTML page, not an image "
                             f"(Content-Type: {kind or 'none'}, HTTP {response.status_code}): "
                             "use the image's own URL")


def _root_cause(exc: BaseException) -> BaseException:
    # requests wraps urllib3 which wraps the socket error; the innermost one
    # ('[Errno 111] Connection refused') is the readable part.
    for _ in range(20):  # bounded: a hand-made cycle in the chain must not hang us
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    if not data:
        raise ImageLoadError(f"{name}: empty (0 bytes)")
    # Pillow warns about, then refuses, images over its global MAX_IMAGE_PIXELS;
    # make the warning an error here rather than change that global for everyone.
    # (The filter is process-wide, so under threads it may lapse; max_pixels still holds.)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageLoadError(
                f"{name}: not an image file (cannot identify image format; "
                f"supported: {', '.join(FORMATS)})"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(f"{name}: image too large, refused as a decompression bomb "
                                 f"({e})") from None
        except Exception as e:
            raise ImageLoadError(f"{name}: unreadable image header ({e})") from None
        return _to_rgb(image, name, limits)


def _to_rgb(image: Image.Image, name: str, limits: ImageLimits) -> Image.Image:
    """Check the size, decode the pixels (first frame), apply EXIF orientation, make RGB."""
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            f"{name}: image too large ({width}x{height} = {width * height} pixels "
            f"> max_pixels={limits.max_pixels})"
        )
    try:
        image.load()
        full_scale = _full_scale(image)  # before transposing: the copy loses .format
        image = ImageOps.exif_transpose(image)
        if full_scale is not None:
            image = _rescale_gray(image, full_scale)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")  # also CMYK, 1-bit, P, YCbCr; copies an RGB image
    except Exception as e:  # bad data shows up only now, as OSError, SyntaxError, ValueError, ...
        reason = f"corrupt, truncated or unsupported image data ({type(e).__name__}: {e})"
        raise ImageLoadError(f"{name}: {reason}") from None


def _full_scale(image: Image.Image) -> float | None:
    """The pixel value that should become 255, for modes Pillow would clip at 255; None otherwise.

    Pillow's own convert('L') clips, so a 16-bit image comes out nearly all white.
    """
    if image.mode.startswith("I;16"):
        return 2**16 - 1
    if image.mode == "I":
        # Older Pillow opens 16-bit grayscale PNGs as 'I' (int32) instead of 'I;16'.
        return 2**16 - 1 if image.format == "PNG" else 2**31 - 1
    if image.mode == "F":
        # Floats carry no bit depth: treat [0, 1] data as normalised, anything else as 0..255.
        values = np.asarray(image)
        peak = float(values[np.isfinite(values)].max(initial=0.0))
        return 1.0 if peak <= 1.0 else 255.0
    return None


def _rescale_gray(image: Image.Image, full_scale: float) -> Image.Image:
    values = np.asarray(image).astype(np.float32) * (255.0 / full_scale)
    values = np.clip(np.nan_to_num(values), 0, 255)  # negatives (signed 'I') and NaN become black
    return Image.fromarray(np.rint(values).astype(np.uint8))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def expand_inputs(items) -> list[str]:
    """Paths, URLs, folders and globs -> the inputs to caption, in order, each file once.

    A folder gives its image files (by extension), recursively and sorted; a pattern with *, ?
    or [ that is not itself a file gives its matches, sorted (** spans folders), so a pattern
    passed quoted still works. Symlinked folders are followed, none twice (a loop ends), and a
    file reached twice (by its real path) is kept once. A folder or pattern that finds no image is
    kept as it is, so that it gets an error naming it; paths and URLs pass through.
    """
    out, seen = [], set()
    for item in map(str, items):
        path = Path(item).expanduser()
        if _is_url(item) or path.is_file():
            found = [item]
        elif path.is_dir():
            found = sorted(str(p) for p in _files_under(path) if _is_image_name(p.name)) or [item]
        elif any(c in item for c in "*?["):
            found = _glob(os.path.expanduser(item)) or [item]
        else:
            found = [item]
        for name in found:
            key = name if _is_url(name) or not os.path.exists(name) else os.path.realpath(name)
            if key not in seen:
                seen.add(key)
                out.append(name)
    return out


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _files_under(root: Path):
    """Every file under `root`, symlinked folders followed but no folder (by real path) twice."""
    folders = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in folders:
            subfolders[:] = []
            continue
        folders.add(real)
        yield from (Path(folder, name) for name in files)


def _glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True)'s image files, sorted, without following a folder twice:
    the folders before the first wildcard are walked, and each file's path below them matched part
    by part (`**`: any number of folders; a name starting with '.' only by a part that does)."""
    parts = Path(pattern).parts
    fixed = next(i for i, p in enumerate(parts + ("*",)) if any(c in p for c in "*?["))
    root, rest = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    found = []
    for file in _files_under(root) if root.is_dir() else ():
        relative = file.relative_to(root).parts
        if _is_image_name(file.name) and _matches(relative, rest) and file.is_file():
            found.append(str(file) if fixed else str(file.relative_to(".")))
    return sorted(found)


def _matches(names: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    if not pattern:
        return not names
    if pattern[0] == "**":
        return any(_matches(names[i:], pattern[1:]) for i in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:i]))
    return bool(names) and (names[0].startswith(".") == pattern[0].startswith(".")) \
        and fnmatch.fnmatchcase(names[0], pattern[0]) and _matches(names[1:], pattern[1:])
