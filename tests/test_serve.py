"""`serve`: the HTTP API against the Captioner it wraps. One real server (uvicorn on a free 127.0.0.1 port, on a
thread) for the module; FastAPI's TestClient for the settings that need an app of their own."""
import base64
import contextlib
import importlib.util
import io
import json
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httpx")),
                                reason="the serve extra is not installed: pip install -e '.[serve]'")

SETTINGS = dict(max_upload_mb=0.25, max_batch_delay_ms=2.0)


class ServerThread:
    """The real server (uvicorn) on a socket bound here to a free 127.0.0.1 port; stops when the block ends."""

    def __init__(self, captioner, settings, info=None):
        from captioning.serve.server import server

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = server(captioner, replace(settings, port=port), info, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return self
            time.sleep(0.05)
        raise TimeoutError("the server did not get ready in 60 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


@pytest.fixture(scope="module")
def captioner(tiny_run):
    from captioning import Captioner
    from captioning.data.images import ImageLimits

    return Captioner.from_checkpoint(tiny_run / "best.pt", limits=ImageLimits(allow_private_urls=True))


@pytest.fixture(scope="module")
def server(captioner):
    from captioning.serve.settings import ServeSettings

    with ServerThread(captioner, ServeSettings(allow_urls=True, allow_private_urls=True, **SETTINGS)) as s:
        yield s


@pytest.fixture(scope="module")
def images(shapes_dir):
    return sorted((shapes_dir / "flickr30k_images").iterdir())[:4]


def post(server, path="/v1/caption", **kwargs):
    import httpx

    return httpx.post(server.url + path, timeout=60, **kwargs)


def test_huggingface_inference_client_gets_the_captioners_caption(server, captioner, images):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    for path in images[:2]:
        assert client.image_to_text(path).generated_text == captioner.caption(path)[0].caption
    raw = post(server, "/", content=images[0].read_bytes(), headers={"Content-Type": "image/png"})
    assert raw.json() == [{"generated_text": captioner.caption(images[0])[0].caption}]


@pytest.mark.parametrize("options", [{}, {"beam": 3, "num_captions": 3, "attention": True},
                                     {"temperature": 0.8, "top_k": 5, "seed": 7, "num_captions": 2},
                                     {"no_repeat_ngram_size": 2, "min_words": 3, "max_words": 6, "attention": True}])
@pytest.mark.parametrize("shape", ["multipart", "json"])
def test_v1_caption_gives_what_captioner_caption_gives(server, captioner, images, options, shape):
    path = images[1]
    if shape == "multipart":
        answer = post(server, files={"image": (path.name, path.read_bytes(), "image/png")},
                      data={k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in options.items()})
    else:
        answer = post(server, json={"image": base64.b64encode(path.read_bytes()).decode(), **options})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    keywords = {("beam_size" if k == "beam" else k): v for k, v in options.items()}
    want = captioner.caption(path, **keywords)[0]
    assert got["caption"] == want.caption
    assert [c["caption"] for c in got["captions"]] == [c["caption"] for c in want.captions]
    assert np.allclose([c["score"] for c in got["captions"]], [c["score"] for c in want.captions], atol=1e-5)
    assert len(got["captions"]) == options.get("num_captions", 1)
    if options.get("attention"):
        assert got["words"] == want.words
        maps = np.array(got["attention"]["maps"])
        assert maps.shape == want.attention.shape and got["attention"]["shape"] == list(want.attention.shape[1:])
        assert np.allclose(maps, want.attention, atol=1e-5)
    else:
        assert "attention" not in got


def test_a_url_is_fetched_with_allow_urls(server, captioner, images):
    answer = post(server, json={"url": server.url + "/no-such-image.png"})
    assert answer.status_code == 400 and "HTTP 404" in answer.json()["error"], answer.text
    with image_server(images[0]) as url:
        answer = post(server, json={"url": url, "beam": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["caption"] == captioner.caption(images[0], beam_size=2)[0].caption


@contextlib.contextmanager
def image_server(path):
    """A one-file HTTP server on 127.0.0.1 (a free port) serving `path`; yields its URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{path.name}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def png_bytes(size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format="PNG")
    return out.getvalue()


def bomb_png() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels (900 M): refused from the header alone."""
    import struct
    import zlib

    data = bytearray(png_bytes())
    ihdr = data[12:29]                                   # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", 30000, 30000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


BAD_IMAGES = {"notes.txt": (b"just some text, not an image\n", "not an image file"),
              "cut.png": (png_bytes()[:60], "corrupt, truncated"),
              "empty.png": (b"", "empty (0 bytes)"),
              "bomb.png": (bomb_png(), "decompression bomb")}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_bad_image_gets_400_and_the_clis_message(server, captioner, name, tmp_path):
    data, reason = BAD_IMAGES[name]
    answer = post(server, files={"image": (name, data, "application/octet-stream")})
    assert answer.status_code == 400, answer.text
    (tmp_path / name).write_bytes(data)
    cli = captioner.caption(tmp_path / name)[0].error            # what `caption` prints after "error: "
    assert answer.json() == {"error": name + cli.removeprefix(str(tmp_path / name))}
    assert reason in answer.json()["error"]
    raw = post(server, "/", content=data, headers={"Content-Type": "image/png"})
    assert raw.status_code == 400 and reason in raw.json()["error"]


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type 'text/plain'"),
    ({"data": {"beam": "99"}, "files": {"image": ("a.png", png_bytes())}}, 422, "beam=99: expected a whole number"),
    ({"data": {"beam": "two"}, "files": {"image": ("a.png", png_bytes())}}, 422, "beam=two"),
    ({"data": {"colour": "1"}, "files": {"image": ("a.png", png_bytes())}}, 422, "unknown option 'colour'"),
    ({"json": {"image": "@@@", "beam": 2}}, 422, "not valid base64"),
    ({"json": {"beam": 2}}, 422, "send one image"),
    ({"json": {"image": base64.b64encode(png_bytes()).decode(), "temperature": 1.0, "beam": 3}}, 422,
     "beam_size=3: must be 1 when sampling"),
    ({"json": {"image": base64.b64encode(png_bytes()).decode(), "max_words": 500}}, 422, "max_words=500"),
    ({"json": {"image": base64.b64encode(png_bytes()).decode(), "top_p": 0}}, 422, "top_p=0"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ({"data": {"beam": "1"}}, 415, "Content-Type 'application/x-www-form-urlencoded'"),
    ({"files": {"image": ("a.png", b"x" * 300_000)}}, 413, "larger than --max-upload-mb"),
])
def test_bad_requests_get_4xx_json_errors_never_500(server, request_kwargs, status, words):
    answer = post(server, **request_kwargs)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]


def test_413_comes_before_the_body_is_read(server):
    """A Content-Length over the cap is answered at once, with most of the body never sent; a chunked body
    without a length is cut off as soon as it passes the cap."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000000\r\n\r\n"
                  + b"\x89PNG" * 100)
        reply = b""
        while b"}" not in reply and (part := s.recv(4096)):      # the headers, then the JSON body
            reply += part
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "larger than --max-upload-mb" in reply

    def chunks():
        for _ in range(40):
            yield b"x" * 16384
    answer = post(server, content=chunks(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 413


def test_health_ready_metrics_docs_and_info(server, images):
    import httpx

    post(server, files={"image": ("a.png", images[0].read_bytes())})
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for line in ('captioning_requests_total{route="/v1/caption",status="200"}', "captioning_batch_size_bucket",
                 "captioning_queue_depth 0.0", "captioning_request_seconds_bucket"):
        assert line in metrics.text, line
    assert "/v1/caption" in httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "swagger" in httpx.get(server.url + "/docs").text.lower()
    info = httpx.get(server.url + "/v1/info").json()
    assert info["allow_urls"] is True and info["model"] == {} and "beam" in info["options"]
    page = httpx.get(server.url + "/", headers={"Accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html") and 'id="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("page.js", "page.css"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200
    assert httpx.get(server.url + "/").json()["service"] == "captioning"


# -----------------------------------------------------------------------------
# apps of their own settings, in-process (FastAPI's TestClient)

@contextlib.contextmanager
def client(captioner, **settings):
    from fastapi.testclient import TestClient

    from captioning.serve.app import build_app
    from captioning.serve.settings import ServeSettings

    with TestClient(build_app(captioner, ServeSettings(**settings)), raise_server_exceptions=False) as c:
        yield c


def test_urls_need_allow_urls_and_private_addresses_need_allow_private_urls(tiny_run, images):
    from captioning import Captioner
    from captioning.data.images import ImageLimits

    public_only = Captioner.from_checkpoint(tiny_run / "best.pt", limits=ImageLimits(allow_private_urls=False))
    with image_server(images[0]) as url:
        with client(public_only) as c:
            answer = c.post("/v1/caption", json={"url": url})
            assert answer.status_code == 403 and "--allow-urls" in answer.json()["error"]
        with client(public_only, allow_urls=True) as c:
            answer = c.post("/v1/caption", json={"url": url})
            assert answer.status_code == 400, answer.text
            assert "refused: 127.0.0.1 is 127.0.0.1, a loopback address" in answer.json()["error"]
            answer = c.post("/v1/caption", json={"url": "file:///etc/passwd"})
            assert answer.status_code == 422 and "only http(s)" in answer.json()["error"]


def test_an_api_key_is_needed_for_inference_when_set(captioner, images):
    body = {"files": {"image": ("a.png", images[0].read_bytes())}}
    with client(captioner, api_key="sesame") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            answer = c.post("/v1/caption", headers=headers, **body)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in answer.json()["error"]
        assert c.post("/", content=images[0].read_bytes(), headers={"Content-Type": "image/png"}).status_code == 401
        assert c.post("/v1/caption", headers={"Authorization": "Bearer sesame"}, **body).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/v1/info").json()["api_key_required"] is True


def blocked(service):
    """Make the app's worker wait on an Event before each batch; returns the Event (its `.busy`: set once the
    worker holds a batch)."""
    gate, real = threading.Event(), service.batcher.caption_fn
    gate.busy = threading.Event()

    def caption_fn(sources, keywords):
        gate.busy.set()
        gate.wait(30)
        return real(sources, keywords)
    service.batcher.caption_fn = caption_fn
    return gate


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after_at_once_and_the_rest_get_captions(captioner, images):
    body = {"files": {"image": ("a.png", images[0].read_bytes())}}
    with client(captioner, max_queue=2, max_batch_size=1) as c:
        service = c.app.state.service
        gate = blocked(service)
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(c.post("/v1/caption", **body))) for _ in range(3)]
        threads[0].start()
        assert gate.busy.wait(30)    # one in the worker, then two waiting
        for t in threads[1:]:
            t.start()
        wait_for(lambda: service.batcher.depth == 2)
        start = time.monotonic()
        refused = c.post("/v1/caption", **body)
        assert time.monotonic() - start < 2
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "queue is full" in refused.json()["error"]
        gate.set()
        for t in threads:
            t.join(30)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert 'captioning_refused_total{reason="queue_full"} 1.0' in c.get("/metrics").text


def test_a_request_past_the_timeout_gets_504_and_leaves_the_queue(captioner, images):
    body = {"files": {"image": ("a.png", images[0].read_bytes())}}
    with client(captioner, timeout_s=0.5, max_batch_size=1) as c:
        service = c.app.state.service
        gate = blocked(service)
        first = threading.Thread(target=lambda: c.post("/v1/caption", **body))
        first.start()                                 # holds the worker
        assert gate.busy.wait(30)
        answer = c.post("/v1/caption", **body)
        assert answer.status_code == 504 and "--timeout 0.5" in answer.json()["error"]
        assert service.batcher.depth == 0
        gate.set()
        first.join(30)


def test_serve_refuses_other_hosts_without_an_api_key_and_names_the_missing_extra(tiny_run, monkeypatch, capsys):
    from captioning.cli.main import main

    monkeypatch.delenv("CAPTIONING_API_KEY", raising=False)
    assert main(["serve", "--checkpoint", str(tiny_run), "--host", "0.0.0.0"]) == 2
    assert "--api-key KEY or $CAPTIONING_API_KEY" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--checkpoint", str(tiny_run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'error: serve needs fastapi: pip install -e ".[serve]"'


def test_the_server_tunes_glibcs_malloc_where_there_is_glibc():
    """Many threads read uploads (one arena each), and a moving mmap threshold put large buffers on the heap: both
    made RSS grow with the requests (benchmarks/serve.py)."""
    import platform

    from captioning.serve.heap import tune_malloc

    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")

