"""Serving under load: `python -m captioning serve` against in-process `Captioner.caption`, side by side in one run.

The model: the reference size (decode.py's `reference_model`: ResNet-152 at 224 px, d_model 512, 6+6 layers, 7,736
words, random weights -- speed does not depend on them -- with <eos> pinned so that every caption is 20 words),
exported with int8 decoder weights (`export_model`, in a process of its own) and run on ONNX Runtime with 2 threads,
by the server (`serve --model DIR --threads 2`, a process of its own on 127.0.0.1) and by this process alike. The
images: 64 random 375x500 JPEGs; the same bytes go to both. Measured:

- offline: `Captioner.caption([bytes])` of one image (median ms), and of all the images in batches of the server's
  --max-batch-size (images/s); timed before and after the served runs, the better of the two kept;
- served: 1, 4, 16 and 64 clients, each posting one image after another to POST / (raw bytes, Hugging Face's
  image-to-text) for --seconds each (at least 2 requests a client): images/s and p50/p95/p99 latency (ms);
- a burst: 4 x --max-queue requests at once: how many got 200, 503 (with Retry-After), another status, or nothing;
- the server's RSS (VmRSS) after its 200th and after its 2000th request.

Goals on 2 CPU cores (issue 24): served_vs_offline >= 0.85, p50_1_ratio <= 1.15, burst_500s = 0 (and no request
lost), rss_growth <= 1.05.

Last line: serve: served_vs_offline=S p50_1_ratio=P p99_ms_16=Q burst_500s=B rss_growth=R ...
(served_vs_offline: served images/s at saturation, the better of 16 and 64 clients, over offline batch images/s;
p50_1_ratio: served p50 at one client over one offline caption; rss_growth: RSS after 2000 requests over after 200.)

    python benchmarks/serve.py [--exports DIR] [--seconds 20] [--json PATH]
    python benchmarks/serve.py --quick         # a tiny model and a few requests: checks the script in about a minute
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import common
from captioning import Captioner

THREADS = 2


def export_to(folder: Path, quick: bool) -> None:
    """--export-to (a child process, so that torch and the tracing stay out of this one): the model, int8."""
    import torch

    from captioning.decode.export import export_model

    if quick:
        model, vocab, cfg = tiny_model()
    else:
        from decode import reference_model
        model, vocab, cfg = reference_model()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export_model(model, vocab, cfg, folder, "int8", "benchmarks/serve.py")


def tiny_model():
    """--quick: a small model of random weights, <eos> pinned as reference_model pins it."""
    import torch

    from captioning.config import from_dict
    from captioning.data.vocab import SPECIALS, Vocabulary
    from captioning.model.caption_model import build_model

    torch.manual_seed(0)
    cfg = from_dict({"model": {"pretrained": False, "backbone": "resnet18", "d_model": 64, "num_heads": 4,
                               "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 128,
                               "max_tokens": 32},
                     "data": {"max_words": 20, "image_size": 64}}, check_paths=False)
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(300)])
    model = build_model(cfg.model, len(vocab), vocab.pad).eval()
    with torch.no_grad():
        model.head.bias[vocab.eos] = float("-inf")
    return model, vocab, cfg


def jpegs(n: int = 64) -> list[bytes]:
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def offline(captioner: Captioner, images: list[bytes], batch: int, rounds: int) -> dict:
    one = statistics.median(common.in_turns({"one": lambda: captioner.caption(images[:1])}, rounds)["one"])
    start = time.perf_counter()
    results = captioner.caption(images, batch_size=batch)
    assert all(r.ok for r in results)
    return {"one_ms": one * 1e3, "batch_ips": len(images) / (time.perf_counter() - start)}


class Server:
    """`python -m captioning serve --model DIR` on a free 127.0.0.1 port, stopped (SIGTERM) when the block ends."""

    def __init__(self, export: Path, batch: int, queue: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "captioning", "serve", "--model", str(export), "--port", str(self.port),
                        "--threads", str(THREADS), "--max-batch-size", str(batch), "--max-queue", str(queue),
                        "--log-level", "warning"]

    def __enter__(self):
        import httpx

        self.process = subprocess.Popen(self.command)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"the server did not get ready: {' '.join(self.command)}")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def load(url: str, images: list[bytes], clients: int, seconds: float, counter: dict, min_each: int = 2) -> dict:
    """`clients` clients posting images one after another for `seconds` (each at least `min_each` requests)."""
    import httpx

    latencies, statuses, stop = [], [], time.perf_counter() + seconds

    async def client(c: int, http) -> None:
        k = 0
        while k < min_each or time.perf_counter() < stop:
            start = time.perf_counter()
            answer = await http.post(url + "/", content=images[(c + k * clients) % len(images)],
                                     headers={"Content-Type": "image/jpeg"})
            latencies.append(time.perf_counter() - start)
            statuses.append(answer.status_code)
            counter["n"] += 1
            if counter["n"] in counter["at"]:
                counter["rss"][counter["n"]] = counter["rss_fn"]()
            k += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        elapsed = time.perf_counter() - start
    assert set(statuses) == {200}, sorted(set(statuses))
    ms = np.array(latencies) * 1e3
    return {"ips": len(latencies) / elapsed, "n": len(latencies), "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99))}


async def burst(url: str, images: list[bytes], n: int) -> dict:
    """`n` requests at once: how many got each status, how many got nothing (a timeout, a reset)."""
    import httpx

    async def one(i: int, http):
        try:
            answer = await http.post(url + "/", content=images[i % len(images)], headers={"Content-Type": "image/jpeg"})
        except httpx.HTTPError:
            return "lost", False
        return answer.status_code, answer.status_code != 503 or "retry-after" in answer.headers

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        results = await asyncio.gather(*(one(i, http) for i in range(n)))
    statuses = [s for s, _ in results]
    return {"200": statuses.count(200), "503": statuses.count(503), "lost": statuses.count("lost"),
            "other": sum(s not in (200, 503, "lost") for s in statuses),
            "500s": sum(isinstance(s, int) and s >= 500 and s != 503 for s in statuses),
            "503_without_retry_after": sum(not ok for _, ok in results)}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few requests: check the script")
    parser.add_argument("--exports", type=Path, help="keep the export here (made when missing, reused when there)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each client count runs")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--export-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_to:
        return export_to(args.export_to, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        export = (args.exports or Path(tmp)) / ("tiny_int8" if args.quick else "reference_int8")
        if not (export / "config.json").is_file():
            subprocess.run([sys.executable, __file__, "--export-to", str(export)] + ["--quick"] * args.quick,
                           check=True)
        measure(args, export)


def measure(args, export: Path) -> None:
    quick, batch, queue = args.quick, args.max_batch_size, args.max_queue
    seconds = 3.0 if quick else args.seconds
    rss_at = (50, 200) if quick else (200, 2000)
    images = jpegs(32 if quick else 64)
    captioner = Captioner.from_export(export, threads=THREADS)
    captioner.caption(images[:batch], batch_size=batch)                 # warm-up
    before = offline(captioner, images, batch, 3 if quick else 5)
    served = {}
    with Server(export, batch, queue) as server:
        counter = {"n": 0, "at": set(rss_at), "rss": {}, "rss_fn": server.rss_mb}
        for clients in (1, 4, 16, 64):
            served[clients] = asyncio.run(load(server.url, images, clients, seconds, counter))
            s = served[clients]
            print(f"served, {clients:2d} clients: {s['ips']:6.2f} images/s, p50 {s['p50']:7.1f} ms, "
                  f"p95 {s['p95']:7.1f} ms, p99 {s['p99']:7.1f} ms ({s['n']} requests)", flush=True)
        b = asyncio.run(burst(server.url, images, 4 * queue))
        print(f"burst of {4 * queue}: {b}", flush=True)
        while counter["n"] < rss_at[-1]:                    # on to the last RSS mark, 16 clients at a time
            asyncio.run(load(server.url, images, 16, 0.0, counter, min_each=max(1, (rss_at[-1] - counter["n"]) // 16)))
        rss = counter["rss"]
    after = offline(captioner, images, batch, 3 if quick else 5)
    best = {"one_ms": min(before["one_ms"], after["one_ms"]), "batch_ips": max(before["batch_ips"], after["batch_ips"])}
    env = common.machine("cpu", "int8")
    print(f"model {'tiny (--quick)' if quick else 'reference size'}, ONNX Runtime int8, {THREADS} threads; "
          f"batch {batch}, queue {queue}")
    print(f"offline, one image: {before['one_ms']:.1f} / {after['one_ms']:.1f} ms (before / after the served runs)")
    print(f"offline, batches of {batch}: {before['batch_ips']:.2f} / {after['batch_ips']:.2f} images/s")
    print(f"server RSS: {rss[rss_at[0]]:.0f} MB after {rss_at[0]} requests, {rss[rss_at[-1]]:.0f} MB after "
          f"{rss_at[-1]}")
    saturated = max(served[16]["ips"], served[64]["ips"])
    figures = {"served_vs_offline": f"{saturated / best['batch_ips']:.2f}",
               "p50_1_ratio": f"{served[1]['p50'] / best['one_ms']:.2f}",
               "p99_ms_16": f"{served[16]['p99']:.0f}", "burst_500s": b["500s"],
               "rss_growth": f"{rss[rss_at[-1]] / rss[rss_at[0]]:.3f}",
               "burst_200": b["200"], "burst_503": b["503"], "burst_lost": b["lost"] + b["503_without_retry_after"],
               "served_ips_64": f"{served[64]['ips']:.2f}", "offline_ips": f"{best['batch_ips']:.2f}",
               "offline_one_ms": f"{best['one_ms']:.0f}", "p50_ms_1": f"{served[1]['p50']:.0f}",
               "rss_mb": f"{rss[rss_at[-1]]:.0f}"}
    common.finish("serve", figures | ({"quick": 1} if quick else {}), env, args.json)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    main()
