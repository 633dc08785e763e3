"""One decoding step of exported graphs, timed side by side: to compare two step graphs (or two exports).

For each export folder, start.onnx and step.onnx are loaded as `Captioner.from_export` loads them, and
20 steps of one row (one image, greedy's batch) are timed after a fresh cache; the folders take turns,
round after round, so that a load that comes and goes weighs on each alike. Prints each folder's median
and 25th percentile per step, and its step graph's node count after ONNX Runtime's optimisation.

Last line: export_step: ms_0=... ms_1=... nodes_0=... nodes_1=... (in the order of the folders given).

    python benchmarks/export_step.py EXPORT_DIR/int8 [OTHER_EXPORT_DIR/int8 ...] [--rounds 40]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from captioning.onnx_engine import OrtEngine, load_session, read_export

STEPS = 20


def node_count(step: Path) -> int:
    """The step graph's nodes after ONNX Runtime's optimisation (all levels, as load_session sets)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "step.onnx")
        ort.InferenceSession(str(step), options, providers=["CPUExecutionProvider"])
        return len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    engines = [OrtEngine(load_session(folder / "start.onnx"), load_session(folder / "step.onnx"), 0)
               for folder in args.exports]
    d_model = read_export(args.exports[0])["config"].model.d_model
    memory = np.random.default_rng(0).standard_normal((1, 49, d_model)).astype(np.float32)
    times = [[] for _ in engines]
    for _ in range(args.rounds + 2):                                   # the first two rounds warm up
        for engine, spent in zip(engines, times):
            cache, token = engine.init_cache(memory), np.array([1])
            start = time.perf_counter()
            for _ in range(STEPS):
                engine.step(cache, token)
            spent.append((time.perf_counter() - start) / STEPS * 1e3)
    parts = []
    for i, (folder, spent) in enumerate(zip(args.exports, times)):
        ms, nodes = float(np.median(spent[2:])), node_count(folder / "step.onnx")
        print(f"{folder}: {ms:.3f} ms / step (25th percentile {np.percentile(spent[2:], 25):.3f}), {nodes} nodes")
        parts.append(f"ms_{i}={ms:.3f} nodes_{i}={nodes}")
    print("export_step: " + " ".join(parts))


if __name__ == "__main__":
    main()
