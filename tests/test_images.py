"""open_image: every input kind, format and mode, and every way an input can be bad.

All files are made in tmp_path and every URL points at a server on 127.0.0.1
started here, so nothing touches the internet.
"""

import gzip
import http.server
import io
import os
import socket
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.data.images import ImageLimits, ImageLoadError, describe, open_image

RED, WHITE = (255, 0, 0), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG built by hand: for what Pillow cannot write (16-bit RGB) and headers that lie about the size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def pixels(image: Image.Image) -> list:
    return [image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)]


def close(actual, expected, tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def raises_naming(source, reason: str, limits: ImageLimits | None = None) -> str:
    """open_image(source) must raise ImageLoadError naming the input and containing `reason`."""
    with pytest.raises(ImageLoadError) as info:
        open_image(source, limits)
    message = str(info.value)
    assert message.startswith(describe(source) + ": "), message
    assert reason in message, message
    return message


# --- formats and input kinds -------------------------------------------------

COLOUR = (200, 40, 90)


@pytest.mark.parametrize("fmt, tolerance", [
    ("JPEG", 6), ("PNG", 0), ("WEBP", 6), ("GIF", 0), ("BMP", 0), ("TIFF", 0),
])
def test_each_format_opens_as_rgb(tmp_path, fmt, tolerance):
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(encode(Image.new("RGB", (16, 8), COLOUR), fmt))
    image = open_image(path)
    assert (image.mode, image.size) == ("RGB", (16, 8))
    assert close(image.getpixel((5, 5)), COLOUR, tolerance)


def test_every_input_kind_gives_the_same_image(tmp_path, monkeypatch):
    data = encode(Image.new("RGB", (4, 3), COLOUR), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    monkeypatch.setenv("HOME", str(tmp_path))
    with Image.open(path) as lazy:   # opened, not yet loaded
        sources = [str(path), path, "~/image.png", data, bytearray(data), memoryview(data), lazy]
        for source in sources:
            image = open_image(source)
            assert (image.mode, image.size, pixels(image)) == ("RGB", (4, 3), [COLOUR] * 12), describe(source)


def test_pil_input_is_neither_modified_nor_returned():
    original = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    image = open_image(original)
    assert image is not original and original.mode == "RGBA"
    assert image.getpixel((0, 0)) == WHITE
    rgb = Image.new("RGB", (2, 2), RED)
    assert open_image(rgb) is not rgb


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in (RED, (0, 0, 255))]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with Image.open(path) as stored:
        assert stored.n_frames == 2
    assert open_image(path).getpixel((0, 0)) == RED


@pytest.mark.parametrize("size", [(1, 1), (10000, 10)])
def test_tiny_and_very_wide_images(size):
    for fmt in ("PNG", "JPEG"):
        image = open_image(encode(Image.new("RGB", size, (0, 0, 255)), fmt))
        assert image.size == size and close(image.getpixel((0, 0)), (0, 0, 255), 6)


# --- modes -------------------------------------------------------------------

def palette_image(transparent: bool) -> Image.Image:
    """2x1 'P' image: pixel 0 uses palette index 1 (transparent or green), pixel 1 index 0 (red)."""
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 1)
    image.putpixel((1, 0), 0)
    if transparent:
        image.info["transparency"] = 1
    return image


def rgba_pair() -> Image.Image:
    """2x1: a fully transparent red pixel, then an opaque red one."""
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    return image


@pytest.mark.parametrize("fmt, image", [
    ("PNG", rgba_pair()),
    ("WEBP", rgba_pair()),
    ("TIFF", rgba_pair()),
    ("PNG", palette_image(transparent=True)),
    ("GIF", palette_image(transparent=True)),
], ids=["png-rgba", "webp-rgba", "tiff-rgba", "png-p-transparent", "gif-p-transparent"])
def test_transparency_is_composited_onto_white(fmt, image):
    params = {"lossless": True} if fmt == "WEBP" else {}
    if "transparency" in image.info:
        params["transparency"] = image.info["transparency"]
    out = open_image(encode(image, fmt, **params))
    assert pixels(out) == [WHITE, RED]


def test_partial_alpha_is_blended_with_white():
    image = open_image(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert close(image.getpixel((0, 0)), (127, 127, 127), 1)


def test_la_is_composited_onto_white(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 0))
    image.putpixel((1, 0), (60, 255))
    assert pixels(open_image(encode(image, "PNG"))) == [WHITE, (60, 60, 60)]


def test_palette_without_transparency_keeps_its_colours():
    assert pixels(open_image(encode(palette_image(transparent=False), "PNG"))) == [(0, 255, 0), RED]


def test_grayscale_and_one_bit():
    assert open_image(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    one_bit = Image.new("1", (2, 1), 0)
    one_bit.putpixel((1, 0), 1)
    assert pixels(open_image(encode(one_bit, "PNG"))) == [(0, 0, 0), WHITE]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted_not_reinterpreted(fmt):
    image = Image.new("CMYK", (2, 1), (255, 0, 0, 0))   # pure cyan
    image.putpixel((1, 0), (0, 0, 0, 255))              # pure black
    out = open_image(encode(image, fmt))
    assert close(out.getpixel((0, 0)), (0, 255, 255), 8), out.getpixel((0, 0))
    assert close(out.getpixel((1, 0)), (0, 0, 0), 8), out.getpixel((1, 0))


SIXTEEN_BIT = [0, 32768, 65535]   # must become 0, ~128, 255, not 0, 255, 255 (clipped)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_files_are_rescaled_by_bit_depth(fmt):
    data = encode(Image.fromarray(np.array([SIXTEEN_BIT], dtype=np.uint16)), fmt)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")   # Pillow 10 opens such PNGs as 'I'
    assert [p[0] for p in pixels(open_image(data))] == [0, 128, 255]


def test_16_bit_big_endian_is_rescaled():
    image = Image.frombytes("I;16B", (3, 1), struct.pack(">3H", *SIXTEEN_BIT))
    assert [p[0] for p in pixels(open_image(image))] == [0, 128, 255]


def test_32_bit_integer_tiff_is_rescaled_by_int32_range():
    values = np.array([[0, 2**30, 2**31 - 1, -100]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    gray = [p[0] for p in pixels(open_image(data))]
    assert gray[0] == 0 and abs(gray[1] - 128) <= 1 and gray[2] == 255 and gray[3] == 0


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.5, 1.0], [0, 128, 255]),               # normalised floats
    ([0.0, 100.0, 255.0, 900.0], [0, 100, 255, 255]),  # 0..255 floats, clipped above
])
def test_float_images(values, expected):
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    assert [p[0] for p in pixels(open_image(encode(image, "TIFF")))] == expected


def test_16_bit_rgb_png():
    row = b"\x00" + struct.pack(">6H", 65535, 0, 0, 0, 32768, 65535)
    image = open_image(png(2, 1, 16, 2, row))
    assert pixels(image) == [RED, (0, 128, 255)]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste(RED, (0, 0, 5, 5))   # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6                 # stored rotated: display turns it 90 degrees clockwise
    plain, rotated = open_image(encode(image, fmt)), open_image(encode(image, fmt, exif=exif))
    assert plain.size == (20, 10) and close(plain.getpixel((1, 1)), RED, 20)
    assert rotated.size == (10, 20)
    assert close(rotated.getpixel((8, 1)), RED, 20)            # the corner is now top-right
    assert close(rotated.getpixel((1, 1)), (0, 0, 255), 20)


# --- bad files and inputs ----------------------------------------------------

def test_missing_path():
    raises_naming("/no/such/dir/photo.jpg", "no such file")


def test_a_folder_without_images_says_so(tmp_path):      # what expand_inputs keeps of an empty folder
    raises_naming(tmp_path, "no images in this folder (looked for .bmp, .gif, .jpeg, .jpg")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    raises_naming(path, "empty")
    raises_naming(b"", "empty")


@pytest.mark.parametrize("name, content", [
    ("random.jpg", np.random.default_rng(0).bytes(4096)),
    ("page.html", b"<!doctype html><html><body><h1>Not found</h1></body></html>"),
    ("notes.txt", b"just some text\n"),
    ("image.ppm", encode(Image.new("RGB", (2, 2)), "PPM")),   # Pillow reads it; we do not
])
def test_non_image_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    raises_naming(path, "not an image file (cannot identify image format")
    raises_naming(str(path), "not an image file")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, "JPEG")
    path = tmp_path / "photo.jpg"
    path.write_bytes(data[: len(data) // 2])
    message = raises_naming(path, "truncated")
    assert "OSError" in message   # Pillow's reason is kept, the exception type is not


def test_corrupt_png():
    data = bytearray(encode(Image.new("RGB", (64, 64), COLOUR), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start:start + 12] = bytes(b ^ 0xFF for b in data[start:start + 12])
    raises_naming(bytes(data), "corrupt")


def test_byte_cap_on_files_and_bytes(tmp_path):
    data = encode(Image.new("RGB", (32, 32), COLOUR), "BMP")
    path = tmp_path / "big.bmp"
    path.write_bytes(data)
    limits = ImageLimits(max_bytes=len(data) - 1)
    raises_naming(path, "max_bytes", limits)
    raises_naming(data, "max_bytes", limits)
    assert open_image(path, ImageLimits(max_bytes=len(data))).size == (32, 32)   # the cap is inclusive


@pytest.mark.parametrize("source", [42, None, [b"\x89PNG"]])
def test_unsupported_source_types(source):
    raises_naming(source, "unsupported source type")


def test_closed_pil_image():
    image = Image.open(io.BytesIO(encode(Image.new("RGB", (4, 4)), "PNG")))
    image.close()
    raises_naming(image, "corrupt, truncated or unsupported")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/a.png", "file:///etc/passwd", "javascript:alert(1)"])
def test_non_http_urls_are_refused(url):
    raises_naming(url, "only http(s) URLs are supported")


def test_a_path_with_a_colon_is_still_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("shot:1.png").write_bytes(encode(Image.new("RGB", (3, 3), RED), "PNG"))
    assert open_image("shot:1.png").getpixel((0, 0)) == RED


# --- decompression bombs -----------------------------------------------------

def test_max_pixels_is_checked_on_a_normal_image():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    raises_naming(data, "100x100 = 10000 pixels > max_pixels=5000", ImageLimits(max_pixels=5000))
    assert open_image(data, ImageLimits(max_pixels=10000)).size == (100, 100)


def test_max_pixels_is_checked_before_decoding():
    # The header claims 9000x9000 over 1 byte of pixel data: decoding would fail
    # as truncated (or allocate 81 MB); the size check must come first.
    raises_naming(png(9000, 9000, 8, 0, b"\x00"), "max_pixels=1000000", ImageLimits(max_pixels=1_000_000))


@pytest.mark.parametrize("width, height", [
    (50_000, 50_000),   # over twice Pillow's MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError
    (9_999, 8_950),     # just over MAX_IMAGE_PIXELS (89.5M), under our 90M: Pillow only warns
])
def test_pillow_bomb_checks_become_image_load_errors(width, height):
    filters, max_pixels = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    raises_naming(png(width, height, 8, 0, b"\x00"), "decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == max_pixels and warnings.filters == filters


# --- URLs --------------------------------------------------------------------

IMAGE_PNG = encode(Image.new("RGB", (8, 8), RED), "PNG")
TRICKLE_INTERVAL = 0.5   # seconds between bytes; under the test's read_timeout, so only the deadline stops it


@pytest.fixture(scope="module")
def server():
    """A local HTTP server; yields (base_url, log) where log records paths and User-Agents."""
    stop = threading.Event()   # ends the trickle and endless handlers at teardown
    log = {"paths": [], "agents": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):   # keep pytest output clean
            pass

        def send(self, status, body=b"", content_type="text/html", headers=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            log["paths"].append(self.path)
            log["agents"].append(self.headers.get("User-Agent"))
            routes = {
                "/image.png": lambda: self.send(200, IMAGE_PNG, "image/png"),
                "/image.gz": lambda: self.send(200, gzip.compress(IMAGE_PNG), "image/png",
                                               [("Content-Encoding", "gzip")]),
                "/page.html": lambda: self.send(200, b"<html><body>hello</body></html>"),
                "/missing": lambda: self.send(404, b"not found"),
                "/error": lambda: self.send(500, b"oops"),
                "/loop": lambda: self.send(302, headers=[("Location", "/loop")]),
                "/redirect": lambda: self.send(302, headers=[("Location", "/image.png")]),
                "/redirect-ftp": lambda: self.send(302, headers=[("Location", "ftp://127.0.0.1/a.png")]),
                "/huge-declared": lambda: self.send_declared(10**12),
                "/slow-headers": self.slow_headers,
                "/trickle": self.trickle,
                "/endless": self.endless,
            }
            routes.get(self.path, lambda: self.send(404))()

        def send_declared(self, length):
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def slow_headers(self):
            if not stop.wait(3):
                self.send(200, IMAGE_PNG, "image/png")

        def trickle(self):
            self.send_declared(len(IMAGE_PNG))
            try:
                for byte in IMAGE_PNG[:40]:   # bounded: at most ~20 s even if nobody hangs up
                    if stop.wait(TRICKLE_INTERVAL):
                        return
                    self.wfile.write(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                pass

        def endless(self):
            self.send_response(200)   # no Content-Length: the body runs until the connection closes
            self.end_headers()
            try:
                for _ in range(2000):   # bounded: 128 MB at most
                    if stop.is_set():
                        return
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", log
    stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # A proxy from the environment would take requests for 127.0.0.1 elsewhere.
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_url_image_with_user_agent(server):
    base, log = server
    image = open_image(base + "/image.png")
    assert (image.mode, image.size, image.getpixel((3, 3))) == ("RGB", (8, 8), RED)
    assert log["agents"][log["paths"].index("/image.png")] == "captioning/0.1"


def test_url_gzip_encoded_body_is_decoded(server):
    assert open_image(server[0] + "/image.gz").getpixel((0, 0)) == RED


def test_url_redirect_is_followed(server):
    assert open_image(server[0] + "/redirect").getpixel((0, 0)) == RED


def test_url_redirect_loop_is_bounded(server):
    base, log = server
    before = log["paths"].count("/loop")
    raises_naming(base + "/loop", "more than 3 redirects", ImageLimits(max_redirects=3))
    assert log["paths"].count("/loop") - before == 4   # the first request and 3 redirects


def test_url_redirect_to_another_scheme_is_refused(server):
    raises_naming(server[0] + "/redirect-ftp", "only http(s) URLs are supported (redirected to ftp://")


@pytest.mark.parametrize("path, reason", [
    ("/missing", "HTTP 404 Not Found"),
    ("/error", "HTTP 500 Internal Server Error"),
    ("/page.html", "the server returned an HTML page"),
    ("/huge-declared", "max_bytes"),
])
def test_url_errors(server, path, reason):
    raises_naming(server[0] + path, reason)


def test_url_endless_body_is_cut_at_max_bytes(server):
    start = time.monotonic()
    raises_naming(server[0] + "/endless", "response larger than max_bytes=100000", ImageLimits(max_bytes=100_000))
    assert time.monotonic() - start < 5


def test_url_trickling_server_is_cut_at_the_deadline(server):
    limits = ImageLimits(deadline=2.0, read_timeout=1.5)
    assert TRICKLE_INTERVAL < limits.read_timeout   # so the read timeout alone would never fire
    start = time.monotonic()
    raises_naming(server[0] + "/trickle", "exceeded the 2 s deadline", limits)
    elapsed = time.monotonic() - start
    assert limits.deadline <= elapsed < limits.deadline + limits.read_timeout + 0.5


def test_url_read_timeout(server):
    start = time.monotonic()
    raises_naming(server[0] + "/slow-headers", "timed out", ImageLimits(read_timeout=0.5))
    assert time.monotonic() - start < 2.5


def test_url_refused_connection():
    with socket.socket() as probe:   # a port that was free a moment ago has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raises_naming(f"http://127.0.0.1:{port}/image.png", "refused")


def test_url_dns_failure(monkeypatch):
    # The lookup is faked: a real one for an unknown name could leave the machine.
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    raises_naming("http://no-such-host.invalid/image.png", "Name or service not known")


# --- describe ----------------------------------------------------------------

def test_describe():
    assert describe("photos/cat.jpg") == "photos/cat.jpg"
    assert describe(Path("photos") / "cat.jpg") == os.path.join("photos", "cat.jpg")
    assert describe("https://example.com/a.png") == "https://example.com/a.png"
    assert describe(b"12345") == describe(bytearray(5)) == describe(memoryview(b"abcde")) == "<bytes: 5>"
    assert describe(Image.new("RGB", (64, 32))) == "<PIL.Image 64x32 RGB>"
    assert describe(42) == "<int>"
    long = describe("x" * 1000)
    assert len(long) == 200 and long.endswith("...")
