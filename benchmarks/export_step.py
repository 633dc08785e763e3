"""One decoding step of exported graphs, timed side by side: to compare two step graphs (or two exports).

For each export folder, start.onnx and step.onnx are loaded as `Captioner.from_export` loads them, and
20 steps of one row (one image, greedy's batch) are timed after a fresh cache; the folders take turns,
round after round, so that a load that comes and goes weighs on each alike. Prints each folder's median
and 25th percentile per step, and its step graph's node count after ONNX Runtime's optimisation.

Last line: export_step: ms_0=... ms_1=... nodes_0=... nodes_1=... (in the order of the folders given).

    python benchmarks/export_step.py EXPORT_DIR/int8 [OTHER_EXPORT_DIR/int8 ...] [--rounds 40] [--json PATH]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

import common
from captioning.decode.onnx_engine import OrtEngine, load_session

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
    parser = common.parser(__doc__)
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    engines = [OrtEngine(load_session(folder / "start.onnx"), load_session(folder / "step.onnx"), 0)
               for folder in args.exports]
    _, grid, d_model = engines[0].start.get_inputs()[0].shape           # memory (M, L, D): L and D as exported
    memory = np.random.default_rng(0).standard_normal((1, grid, d_model)).astype(np.float32)
    token, steps, fresh = np.array([1]), {}, {}       # STEPS steps of one row from a fresh cache (made untimed)
    for i, engine in enumerate(engines):
        steps[str(i)] = lambda cache, engine=engine: [engine.step(cache, token) for _ in range(STEPS)]
        fresh[str(i)] = lambda engine=engine: engine.init_cache(memory)
    times = common.in_turns(steps, args.rounds, warmup=2, prepare=fresh)
    env, figures = common.machine("cpu"), {}
    for i, folder in enumerate(args.exports):
        spent = np.array(times[str(i)]) / STEPS * 1e3                  # ms a step
        ms, nodes = float(np.median(spent)), node_count(folder / "step.onnx")
        print(f"{folder}: {ms:.3f} ms / step (25th percentile {np.percentile(spent, 25):.3f}), {nodes} nodes")
        figures |= {f"ms_{i}": f"{ms:.3f}", f"nodes_{i}": nodes}
    common.finish("export_step", figures, env, args.json)


if __name__ == "__main__":
    main()
