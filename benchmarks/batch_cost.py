"""What a batch of 32 costs beyond its bare encoder graph, part by part, for one export.

`decode.py`'s batch efficiency is the bare encoder graph's time for 32 preprocessed images over
`Captioner.caption` of the same 32 photos. This splits the difference: the photos opened (the
square resize, `Captioner._open`), turned into arrays (`transform`), the encoder run as `caption`
runs it (`encode`, 8 images a call), the decoder's start (each image's cross-attention keys and
values), the 20 steps, and the search's own work between them (rules, log-softmax, picking words).
Each part is timed in turns with the others, round after round (medians); the steps and the start
are timed inside the search, by wrapping the engine's two calls.

Last line: batch_cost: encoder_ms=... caption_ms=... efficiency=... open_ms=... transform_ms=...
encode_ms=... chunks_ms=... start_ms=... steps_ms=... search_other_ms=... rest_ms=... budget_ms=...
weights=... (chunks: what encoding 8 at a time adds, encode - transform - encoder; rest: caption
less every part; budget: what may come on top of the bare encoder for an efficiency of 0.9,
encoder_ms / 0.9 - encoder_ms; weights: the export's int8 encoder weights, "-64..64", "int8" for
full range, or "fp32")

    python benchmarks/decode.py --exports DIR        # makes DIR/fp32, DIR/int8, DIR/all_int8 once
    python benchmarks/batch_cost.py DIR/all_int8 [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import common
from captioning import Captioner
from captioning.decode.onnx_engine import encoder_recipe
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
        total = time.perf_counter() - start
        parts.append((timed.seconds["start"], timed.seconds["steps"],
                      total - timed.seconds["start"] - timed.seconds["steps"]))

    captioner.engine = timed
    words = len(captioner.caption(images[:1])[0].caption.split())
    assert words == WORDS, f"{args.export}: {words} words, not {WORDS} (make it with decode.py --exports)"
    t = common.medians({"encoder": lambda: captioner.memory(images=x32),
                        "caption": lambda: captioner.caption(images, batch_size=32),
                        "open": lambda: [captioner._open(p) for p in images],
                        "transform": lambda: np.stack([captioner.transform(p) for p in opened]),
                        "encode": lambda: captioner.encode(opened),
                        "search": search}, args.repeats)
    start, steps, other = (float(np.median(column)) * 1e3 for column in np.array(parts[-args.repeats:]).T)
    env = common.machine("cpu", captioner.precision)
    ms = {key: value * 1e3 for key, value in t.items()}
    chunks = ms["encode"] - ms["transform"] - ms["encoder"]
    figures = {"encoder_ms": ms["encoder"], "caption_ms": ms["caption"], "efficiency": t["encoder"] / t["caption"],
               "open_ms": ms["open"], "transform_ms": ms["transform"], "encode_ms": ms["encode"], "chunks_ms": chunks,
               "start_ms": start, "steps_ms": steps, "search_other_ms": other,
               "rest_ms": ms["caption"] - ms["open"] - ms["encode"] - start - steps - other,
               "budget_ms": ms["encoder"] / 0.9 - ms["encoder"]}
    weights = (encoder_recipe(captioner.export) or {}).get("weights", "fp32").replace("int8, ", "")
    print(f"{args.export}: 32 photos, {WORDS} words each; {env.get('threads')} threads; encoder weights {weights}")
    common.finish("batch_cost", {**{key: f"{value:.2f}" if key == "efficiency" else f"{value:.1f}"
                                    for key, value in figures.items()}, "weights": weights}, env, args.json)


if __name__ == "__main__":
    main()
