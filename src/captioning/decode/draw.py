"""One word per row, drawn by inverse transform with a numpy generator's uniforms: the same draw on
either engine and any device, so a seed gives the same captions from a checkpoint and its export."""
from __future__ import annotations

from typing import Any

import numpy as np

Array = Any     # a torch.Tensor or a numpy.ndarray


def inverse_cdf(ops, probs: Array, generator: np.random.Generator) -> Array:
    """One word per row of probs (N, V), drawn by inverse transform with a numpy `generator`'s
    uniforms. In float64, so u * total < total and a word of probability 0 is never drawn; a row
    that sums to 0 or nan (softmax overflow at a tiny temperature) is a ValueError, as in
    torch.multinomial."""
    cumulative = ops.cast(probs, "float64").cumsum(-1)
    total = cumulative[:, -1]
    if not bool(((total > 0) & (total < float("inf"))).all()):
        raise ValueError("sampling: a row's probabilities sum to 0, inf or nan "
                         "(is the temperature too low?)")
    u = ops.asarray(generator.random(len(probs)), "float64") * total
    return (cumulative <= u[:, None]).sum(-1).clip(max=probs.shape[-1] - 1)


