"""The decoder's key/value cache: what a search keeps between steps, whichever engine fills it.

Its arrays are torch tensors (the PyTorch model) or numpy arrays (ONNX Runtime); this module imports
neither engine, so captioning from an export never loads torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Array = Any     # a torch.Tensor or a numpy.ndarray


@dataclass
class DecoderCache:
    """Keys and values of every decoder layer for N sequences decoded side by side.

    The N rows are grouped `group` at a time per image (beam search: the K
    beams of one image), and rows of one group share their image's
    cross-attention keys/values rather than holding G copies of them.
    """
    self_k: list[Array]    # per layer (N, H, T, hd): one entry per word fed so far
    self_v: list[Array]
    cross_k: list[Array]   # per layer (M, H, L, hd): from memory, computed once; N = M * group
    cross_v: list[Array]

    @property
    def length(self) -> int:
        """Words fed so far, which is also the position of the next one."""
        return self.self_k[0].shape[2]

    @property
    def group(self) -> int:
        return self.self_k[0].shape[0] // self.cross_k[0].shape[0]

    def select(self, rows: Array, images: Array | None = None) -> DecoderCache:
        """Keep sequences `rows` (N',) and images `images` (M',), in that order.

        Reordering beams within their images leaves the images as they are
        (images=None); dropping finished sequences or images passes both.
        """
        def pick(ts: list[Array], index: Array) -> list[Array]:
            return [t[index] for t in ts]

        cross_k, cross_v = (self.cross_k, self.cross_v) if images is None else \
            (pick(self.cross_k, images), pick(self.cross_v, images))
        cache = DecoderCache(pick(self.self_k, rows), pick(self.self_v, rows), cross_k, cross_v)
        assert cache.self_k[0].shape[0] % cache.cross_k[0].shape[0] == 0, \
            "rows must be whole groups per image"
        return cache
