"""`python -m captioning serve` as a process: SIGTERM during a burst answers every request in flight, then exits 0."""
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httpx")),
                                 reason="the serve extra is not installed: pip install -e '.[serve]'")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_answers_the_requests_in_flight_and_exits_0(tiny_run, shapes_dir):
    import httpx

    port, burst = free_port(), 6
    url = f"http://127.0.0.1:{port}"
    # a long batch delay and a batch that holds the whole burst: the requests wait in the queue when SIGTERM comes
    process = subprocess.Popen([sys.executable, "-m", "captioning", "serve", "--checkpoint", str(tiny_run / "best.pt"),
                                "--port", str(port), "--max-batch-delay-ms", "3000", "--max-batch-size", "64",
                                "--log-level", "warning"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        image = sorted((shapes_dir / "flickr30k_images").iterdir())[0].read_bytes()
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            httpx.post(url + "/", content=image, headers={"Content-Type": "image/png"}, timeout=60)))
            for _ in range(burst)]
        for t in threads:
            t.start()
        queued = re.compile(rf"^captioning_queue_depth {burst}\.0$", re.M)
        while not queued.search(httpx.get(url + "/metrics").text):
            assert time.monotonic() < deadline, "the burst never queued up"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert process.wait(60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert len(answers) == burst
    assert [a.status_code for a in answers] == [200] * burst
    assert len({a.json()[0]["generated_text"] for a in answers}) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
