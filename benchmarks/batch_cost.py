"""What a batch of 32 costs beyond its bare encoder graph, part by part, for one export.

`decode.py`'s batch efficiency is the bare encoder graph's time for 32 preprocessed images over
`Captioner.caption` of the same 32 photos. This splits the difference: the photos opened (the
square resize, `Captioner._open`), turned into arrays (`transform`), the encoder run as `caption`
runs it (`encode`, 8 images a call), the decoder's start (each image's cross-attention keys and
values), the 20 steps, and the search's own work between them (rules, log-softmax, picking words).
Each part is timed in turns with the others, round after round (medians); the steps and the start
are timed inside the search, by wrapping the engine's two calls.

Last line: batch_cost: encoder_ms=... caption_ms=... efficiency=... open_ms=... transform_ms=...
encode_ms=... start_ms=... steps_ms=... search_other_ms=... budget_ms=... (budget: what may come on
top of the bare encoder for an efficiency of 0.9, encoder_ms / 0.9 - encoder_ms)

    python benchmarks/decode.py --exports DIR        # makes DIR/fp32, DIR/int8, DIR/all_int8 once
    python benchmarks/batch_cost.py DIR/all_int8 [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import common
from captioning import Captioner
from decode import WORDS, photos


class TimedEngine:
    """An engine whose init_cache and step calls add their seconds to `seconds`."""

    def __init__(self, engine):
        self.engine, self.pad_id, self.seconds = engine, engine.pad_id, {"start": 0.0, "steps": 0.0}

    def _timed(self, part, call, *args, **kwargs):
        start = time.perf_counter()
        out = call(*args, **kwargs)
        self.seconds[part] += time.perf_counter() - start
        return out

    def init_cache(self, *args, **kwargs):
        return self._timed("start", self.engine.init_cache, *args, **kwargs)

    def step(self, *args, **kwargs):
        return self._timed("steps", self.engine.step, *args, **kwargs)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("export", type=Path, help="an export folder, e.g. decode.py's DIR/all_int8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    captioner = Captioner.from_export(args.export)
    images = photos()
    opened = [captioner._open(p) for p in images]
    x32 = np.stack([captioner.transform(p) for p in opened])
    memory = captioner.memory(images=x32)
    options = captioner.options()
    timed = TimedEngine(captioner.engine)
    parts = []

    def search():
        timed.seconds.update(start=0.0, steps=0.0)
        start = time.perf_counter()
        captioner.search(memory, options)
        parts.append((time.perf_counter() - start, timed.seconds["start"], timed.seconds["steps"]))

    captioner.engine = timed
    words = len(captioner.caption(images[:1])[0].caption.split())
    assert words == WORDS, f"{args.export}: {words} words, not {WORDS} (make it with decode.py --exports)"
    t = common.medians({"encoder": lambda: captioner.memory(images=x32),
                        "caption": lambda: captioner.caption(images, batch_size=32),
                        "open": lambda: [captioner._open(p) for p in images],
                        "transform": lambda: np.stack([captioner.transform(p) for p in opened]),
                        "encode": lambda: captioner.encode(opened),
                        "search": search}, args.repeats)
    parts = np.array(parts[1:])                                  # the warm-up round left out
    total, start, steps = (float(np.median(parts[:, i])) for i in range(3))
    env = common.machine("cpu", captioner.precision)
    ms = {key: value * 1e3 for key, value in t.items()}
    figures = {"encoder_ms": ms["encoder"], "caption_ms": ms["caption"], "efficiency": t["encoder"] / t["caption"],
               "open_ms": ms["open"], "transform_ms": ms["transform"], "encode_ms": ms["encode"],
               "start_ms": start * 1e3, "steps_ms": steps * 1e3, "search_other_ms": (total - start - steps) * 1e3,
               "budget_ms": ms["encoder"] / 0.9 - ms["encoder"]}
    print(f"{args.export}: 32 photos, {WORDS} words each; {env.get('threads')} threads")
    common.finish("batch_cost", {key: f"{value:.2f}" if key == "efficiency" else f"{value:.1f}"
                                 for key, value in figures.items()}, env, args.json)


if __name__ == "__main__":
    main()
