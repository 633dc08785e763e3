"""Which addresses an image URL may reach (data/url_safety.py), checked at every redirect hop on the address connected
to. Every server here listens on 127.0.0.x; to play a public host, 127.0.0.1 is *classified* as public, and every
connection is recorded and held to 127.0.0.x, so that no test sends anything elsewhere, even when the code is wrong."""
import contextlib
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from captioning.data import url_safety
from captioning.data.images import ImageLimits, ImageLoadError, open_image
from captioning.data.url_safety import address_kind

METADATA = "http://169.254.169.254/latest/meta-data/"


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(out, format="PNG")
    return out.getvalue()


@contextlib.contextmanager
def http_server(host: str, routes: dict):
    """A server on host:free port; routes: path -> (status, headers, body). Yields (base URL, list of paths asked)."""
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer((host, 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}", asked
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def connections(monkeypatch):
    """127.0.0.1 plays a public host; every connection is recorded, and one outside 127.0.0.x fails the test."""
    real_kind, real_connect, made = url_safety.address_kind, url_safety.connection.create_connection, []
    monkeypatch.setattr(url_safety, "address_kind", lambda ip: None if ip == "127.0.0.1" else real_kind(ip))

    def connect(address, *args, **kwargs):
        made.append(address[0])
        assert address[0].startswith("127.0.0."), f"a connection to {address[0]} was attempted"
        return real_connect(address, *args, **kwargs)
    monkeypatch.setattr(url_safety.connection, "create_connection", connect)
    return made


@pytest.mark.parametrize("ip, kind", [("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
                                      ("169.254.169.254", "link-local"), ("fe80::1%2", "link-local"),
                                      ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("fd00::1", "private"),
                                      ("100.64.0.1", "non-public"), ("224.0.0.1", "non-public"),
                                      ("93.184.216.34", None), ("2606:4700::1111", None)])
def test_address_kinds(ip, kind):
    assert address_kind(ip) == kind


def test_public_only_refuses_loopback_before_connecting():
    with http_server("127.0.0.1", {"/a.png": (200, {}, png())}) as (base, asked):
        for host in ("127.0.0.1", "localhost"):
            url = base.replace("127.0.0.1", host) + "/a.png"
            with pytest.raises(ImageLoadError, match=rf"^{url}: refused: {host} is (127\.0\.0\.1|::1), a loopback "
                                                     r"address \(only public addresses are fetched here\)$"):
                open_image(url, ImageLimits(allow_private_urls=False))
        assert asked == []
        assert open_image(base + "/a.png", ImageLimits(allow_private_urls=True)).size == (8, 8)


def test_a_redirect_from_a_public_host_to_the_metadata_address_is_refused_by_default(connections):
    """What `caption` did before: follow a public page's redirect to 169.254.169.254."""
    with http_server("127.0.0.1", {"/a.png": (302, {"Location": METADATA}, b"")}) as (base, asked):
        with pytest.raises(ImageLoadError) as refused:
            open_image(base + "/a.png")
    assert str(refused.value) == (f"{base}/a.png: refused: a redirect from a public address to 169.254.169.254, "
                                  f"which is 169.254.169.254, a link-local address (redirected to {METADATA})")
    assert asked == ["/a.png"] and connections == ["127.0.0.1"]


def test_a_redirect_to_another_loopback_host_is_refused_unless_private_urls_are_allowed(connections):
    with http_server("127.0.0.2", {"/b.png": (200, {"Content-Type": "image/png"}, png())}) as (inner, inner_asked):
        routes = {"/a.png": (302, {"Location": inner + "/b.png"}, b"")}
        with http_server("127.0.0.1", routes) as (base, _):
            for policy in (None, False):
                with pytest.raises(ImageLoadError, match="127.0.0.2, a loopback address"):
                    open_image(base + "/a.png", ImageLimits(allow_private_urls=policy))
            assert inner_asked == [] and set(connections) == {"127.0.0.1"}
            assert open_image(base + "/a.png", ImageLimits(allow_private_urls=True)).size == (8, 8)
            assert inner_asked == ["/b.png"]


def test_a_url_the_user_gives_on_their_own_network_may_redirect_within_it(connections):
    with http_server("127.0.0.2", {"/b.png": (200, {}, png())}) as (inner, _):
        with http_server("127.0.0.3", {"/a.png": (302, {"Location": inner + "/b.png"}, b"")}) as (base, _):
            assert open_image(base + "/a.png").size == (8, 8)          # the default: the user chose 127.0.0.3
    assert connections == ["127.0.0.3", "127.0.0.2"]


def test_the_address_checked_is_the_address_connected_to(connections, monkeypatch):
    """A name that resolves to a refused and an allowed address: only the allowed one is ever connected to."""
    with http_server("127.0.0.1", {"/a.png": (200, {}, png())}) as (base, asked):
        port = int(base.rsplit(":", 1)[1])
        answer = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("169.254.169.254", "127.0.0.1")]
        monkeypatch.setattr(url_safety.socket, "getaddrinfo", lambda host, *a, **k: answer)
        image = open_image(f"http://pictures.example:{port}/a.png", ImageLimits(allow_private_urls=False))
    assert image.size == (8, 8) and asked == ["/a.png"] and connections == ["127.0.0.1"]


def test_caption_reports_the_refused_redirect_as_its_error_line(connections, tiny_run, capsys):
    from captioning.cli.main import main

    with http_server("127.0.0.1", {"/a.png": (301, {"Location": METADATA}, b"")}) as (base, _):
        assert main(["caption", "--checkpoint", str(tiny_run), "--json", base + "/a.png"]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["input"] == base + "/a.png" and "refused: a redirect from a public address" in line["error"]
    assert connections == ["127.0.0.1"]
