"""ONNX Runtime's threads: spinning within a run against never spinning, side by side in one process.

An export runs as three sessions (encoder, start, step) taking turns on the same cores. With
spinning off, a session's worker threads sleep whenever they run out of work and are woken for
every operator that runs in parallel: a decoding step has a few hundred operators, each woken for.
With spinning on and left on, the idle threads of one session keep spinning after its run and
starve the next session's. `onnx_engine.load_session` lets the threads spin within a run and stops
them when it returns (`session.force_spinning_stop`); `onnx_engine.SPIN_WITHIN_RUN = False` gives
the sessions as they were before, threads that never spin.

Two captioners of one export, one of each, caption the same photos in turns, round after round
(medians): one photo, and 32 in one batch; and each bare encoder graph on 32 preprocessed images,
for the batch efficiency (as decode.py measures it); and a folder of 96 JPEG photos in batches of
16, which four threads open while the model runs (`caption_iter`'s default). Also the CPU time the process uses in the
0.3 s after a run of a spinning session that is not stopped, and of `load_session`'s (threads
that went on spinning), and whether both captioners give the same captions.

With --served, also two `serve` processes of the export on 127.0.0.1 (threads never spinning:
CAPTIONING_ORT_SPIN=0; and the default), each posted one JPEG at a time, in turns with the two
captioners here captioning the same bytes: the served latency against the in-process one.

Last line: session_threads: one_ms_never=... one_ms=... speedup_one=... batch_ms_never=...
batch_ms=... speedup_batch=... batch_efficiency_never=... batch_efficiency=... folder_s_never=...
folder_s=... idle_cpu_ms_spinning=... idle_cpu_ms=... same_captions=... [served_ms_never=... served_ms=...
offline_ms_never=... offline_ms=...]

    python benchmarks/decode.py --exports DIR        # makes DIR/fp32, DIR/int8, DIR/all_int8 once
    python benchmarks/session_threads.py DIR/all_int8 [--rounds 20] [--served] [--json PATH]
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from captioning import Captioner
from captioning.decode import onnx_engine
from decode import photos


def idle_cpu_ms(export: Path, stop: bool, x: np.ndarray) -> float:
    """CPU milliseconds this process uses while sleeping 0.3 s right after a run of the encoder
    graph, in a session whose threads spin (and, with `stop`, stop spinning when a run returns)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1" if stop else "0")
    session = ort.InferenceSession(str(export / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: x})
    start = time.process_time()
    time.sleep(0.3)
    return (time.process_time() - start) * 1e3


def pair(key: str, seconds: dict, scale: float = 1e3, digits: int = 1, suffix: str = "") -> dict[str, str]:
    """Last-line figures of the two settings: KEY_never and KEY (within runs), from `seconds`' entries
    never+suffix and within_run+suffix, times `scale`."""
    return {f"{key}_never": f"{seconds['never' + suffix] * scale:.{digits}f}",
            key: f"{seconds['within_run' + suffix] * scale:.{digits}f}"}


def served(export: Path, captioners: dict, rounds: int) -> dict[str, float]:
    """--served: median seconds of one JPEG posted to a `serve` process whose threads never spin
    and to one whose threads spin within runs (never_served, within_run_served), and of each
    captioner here on the same bytes (never_offline, within_run_offline)."""
    import httpx

    from serve import Server, jpegs

    jpeg, servers, before = jpegs(1)[0], {}, os.environ.get(onnx_engine.SPIN_ENV)
    with contextlib.ExitStack() as stack:
        try:
            for name, spin in (("never", "0"), ("within_run", "")):
                os.environ[onnx_engine.SPIN_ENV] = spin          # the server process inherits it
                servers[name] = stack.enter_context(Server(export, 8, 64))
        finally:
            os.environ.pop(onnx_engine.SPIN_ENV)
            if before is not None:
                os.environ[onnx_engine.SPIN_ENV] = before
        client = stack.enter_context(httpx.Client(timeout=120))

        def post(url):
            response = client.post(url + "/", content=jpeg)
            response.raise_for_status()

        jobs = {}
        for name in servers:
            jobs[f"{name}_served"] = lambda url=servers[name].url: post(url)
            jobs[f"{name}_offline"] = lambda c=captioners[name]: c.caption([jpeg], batch_size=1)
        return common.medians(jobs, rounds, warmup=2)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("export", type=Path, help="an export folder, e.g. decode.py's DIR/all_int8")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of one photo (batches: a fifth of them)")
    parser.add_argument("--served", action="store_true", help="also one JPEG at a time through two `serve` processes")
    args = parser.parse_args()
    env = common.machine("cpu", "fp32")
    captioners = {}
    for name, spin in (("never", False), ("within_run", True)):
        onnx_engine.SPIN_WITHIN_RUN = spin
        captioners[name] = Captioner.from_export(args.export)
    onnx_engine.SPIN_WITHIN_RUN = True
    images = photos()
    x = np.stack([np.asarray(captioners["never"].transform(p)) for p in images])
    one = common.medians({name: (lambda c=c: c.caption(images[:1], batch_size=1))
                          for name, c in captioners.items()}, args.rounds)
    batch_jobs = {}
    for name, c in captioners.items():
        batch_jobs[f"{name}_batch"] = lambda c=c: c.caption(images, batch_size=32)
        batch_jobs[f"{name}_encoder"] = lambda c=c: c.encoder.memory(images=x)
    batch = common.medians(batch_jobs, max(1, args.rounds // 5))
    with tempfile.TemporaryDirectory() as tmp:
        folder = [Path(tmp) / f"{i:03d}.jpg" for i in range(96)]
        for path, photo in zip(folder, photos(96)):
            photo.save(path, quality=90)
        stream = common.medians({name: (lambda c=c: list(c.caption_iter(folder, batch_size=16)))
                                 for name, c in captioners.items()}, max(1, args.rounds // 5))
    captions = {name: [r.caption for r in c.caption(images, batch_size=32)] for name, c in captioners.items()}
    efficiency = {name: batch[f"{name}_encoder"] / batch[f"{name}_batch"] for name in captioners}
    idle_spinning, idle = idle_cpu_ms(args.export, False, x[:1]), idle_cpu_ms(args.export, True, x[:1])
    for name in captioners:
        print(f"{name:10s} one photo {one[name] * 1e3:7.1f} ms   32 photos {batch[f'{name}_batch'] * 1e3:7.1f} ms "
              f"(bare encoder {batch[f'{name}_encoder'] * 1e3:7.1f} ms, efficiency {efficiency[name]:.2f})   "
              f"96 JPEGs {stream[name]:.2f} s")
    extra = {}
    if args.served:
        t = served(args.export, captioners, args.rounds)
        extra = {**pair("served_ms", t, suffix="_served"), **pair("offline_ms", t, suffix="_offline")}
        print(f"one JPEG served: never {extra['served_ms_never']} ms, within runs {extra['served_ms']} ms; here: "
              f"never {extra['offline_ms_never']} ms, within runs {extra['offline_ms']} ms")
    common.finish("session_threads", {
        **pair("one_ms", one), "speedup_one": f"{one['never'] / one['within_run']:.2f}",
        **pair("batch_ms", batch, suffix="_batch"),
        "speedup_batch": f"{batch['never_batch'] / batch['within_run_batch']:.2f}",
        **pair("batch_efficiency", efficiency, scale=1, digits=2), **pair("folder_s", stream, scale=1, digits=2),
        "idle_cpu_ms_spinning": f"{idle_spinning:.1f}", "idle_cpu_ms": f"{idle:.1f}",
        "same_captions": int(captions["never"] == captions["within_run"]), **extra}, env, args.json)


if __name__ == "__main__":
    main()
