"""The web page at GET /, in a real browser: Playwright drives the system Chromium (Debian's `chromium`; Playwright's
own browser download is not used) against the real server on a free 127.0.0.1 port.

Without chromium these tests skip, saying how to install it; `.ci/run` installs it and sets
CAPTIONING_REQUIRE_BROWSER=1, which makes a missing browser a failure there. CAPTIONING_SERVE_SCREENSHOT=PATH saves
the captioned page there (imgs/serve.png); CAPTIONING_SERVE_CHECKPOINT=CKPT serves that model instead of the tiny run.
"""
import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

from test_serve import ServerThread

try:
    from playwright.sync_api import expect
except ImportError:       # the browser fixture skips (or fails in CI) with the reason
    expect = None

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httpx")),
                                 reason="the serve extra is not installed: pip install -e '.[serve]'")]
INSTALL = "no chromium found: sudo apt-get install -y chromium (the page's tests drive the system browser)"


@pytest.fixture(scope="module")
def browser():
    path = os.environ.get("CAPTIONING_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    why = None if path else INSTALL
    if importlib.util.find_spec("playwright") is None:
        why = "playwright is not installed: pip install playwright (it drives the system chromium)"
    if why:
        if os.environ.get("CAPTIONING_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, args=["--no-sandbox"], headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return Path(os.environ.get("CAPTIONING_SERVE_CHECKPOINT") or tiny_run / "best.pt")


@pytest.fixture(scope="module")
def captioner(checkpoint):
    from captioning import Captioner

    return Captioner.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def server(captioner, checkpoint):
    from captioning.serve.load import describe_model
    from captioning.serve.settings import ServeSettings

    with ServerThread(captioner, ServeSettings(), describe_model(captioner, checkpoint)) as s:
        yield s


@pytest.fixture
def page(browser, server):
    """A fresh page on the server's GET /, every request it makes recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.console = []
    page.on("console", lambda message: page.console.append(message.text))
    page.goto(server.url + "/")
    # locator expectations, not wait_for_function: the page's Content-Security-Policy forbids eval
    expect(page.locator("#model")).to_contain_text("d_model")
    yield page
    assert not [m for m in page.console if "Content Security Policy" in m], page.console
    page.close()


def overlay_pixels(page) -> int:
    """How many pixels of the attention overlay are drawn (not fully transparent)."""
    return page.evaluate("""() => {
        const c = document.getElementById('overlay');
        if (!c.width || !c.height) return 0;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;
    }""")


def test_an_uploaded_image_gets_the_captioners_caption_and_each_word_its_attention(page, server, captioner,
                                                                                      shapes_dir, tmp_path):
    image = sorted((shapes_dir / "flickr30k_images").iterdir())[5]
    page.set_input_files("#file", str(image))
    expect(page.locator("#caption")).to_have_text(re.compile(r"\S"))
    beam, num = int(page.input_value("#beam")), int(page.input_value("#num"))
    want = captioner.caption(image, beam_size=beam, num_captions=num, attention=True)[0]
    assert page.text_content("#caption") == want.caption
    assert page.locator("#nbest .text").all_text_contents() == [c["caption"] for c in want.captions]
    words = page.locator(".word")
    assert words.all_text_contents() == [w for w in want.words if w != "<eos>"]

    assert overlay_pixels(page) == 0
    words.nth(0).hover()
    assert overlay_pixels(page) > 0
    assert page.eval_on_selector("#overlay", "c => c.dataset.word") == want.words[0]
    words.nth(1).click()                                # pinned: it stays when the pointer leaves
    page.mouse.move(5, 5)
    assert overlay_pixels(page) > 0 and page.eval_on_selector("#overlay", "c => c.dataset.word") == want.words[1]
    assert page.locator("#error").is_hidden()
    assert all(url.startswith((server.url, "blob:", "data:")) for url in page.requests), page.requests
    page.screenshot(path=os.environ.get("CAPTIONING_SERVE_SCREENSHOT") or str(tmp_path / "serve.png"), full_page=True)


def test_a_text_file_shows_its_error_in_words(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a photo\n")
    page.set_input_files("#file", str(notes))
    expect(page.locator("#error")).to_be_visible()
    error = page.text_content("#error")
    assert error.startswith("notes.txt: not an image file") and error.endswith("(HTTP 400)")
    assert page.text_content("#caption") == "" and page.locator(".word").count() == 0


def test_changing_the_beam_captions_again_with_it(page, captioner, shapes_dir):
    image = sorted((shapes_dir / "flickr30k_images").iterdir())[7]
    page.set_input_files("#file", str(image))
    expect(page.locator("#caption")).to_have_text(re.compile(r"\S"))
    page.fill("#num", "1")          # a range input: fill sets its value and fires input
    page.fill("#beam", "1")
    expect(page.locator("#nbest li")).to_have_count(1)
    assert page.text_content("#caption") == captioner.caption(image)[0].caption
