"""Decoding: memory -> words. The search (greedy, beam, sampling, rules, attention maps) written
once over an engine and its array operations; the engines' other halves (PyTorch: `torch_engine`,
ONNX Runtime: `onnx_engine`) and the export that writes the ONNX graphs.

May import `model`, `data` and the foundation. `search`, `rules`, `arrays`, `draw` and `onnx_engine`
import no torch: captioning from an export never loads it.
"""
