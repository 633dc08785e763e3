"""The few array operations the search needs beyond what torch tensors and numpy arrays share.

`ArrayOps` names them; `NumpyOps` here works on numpy arrays (the ONNX Runtime engine's),
`torch_ops.TorchOps` on tensors. The search is written once against `array_ops(x)`, and a process
that captions from an export never imports torch.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .draw import inverse_cdf

Array = Any     # a torch.Tensor or a numpy.ndarray


class ArrayOps(Protocol):
    """What the search does to its engine's arrays beyond what tensors and numpy arrays share
    (indexing, arithmetic, argmax, cumsum, tolist, ...).

    A dtype is named: "int64", "float32" or "float64". Operations on rows work along the last axis.
    """

    def asarray(self, values, dtype: str) -> Array: ...

    def cast(self, x: Array, dtype: str) -> Array: ...  # a new array: the search writes into it

    def log_softmax(self, x: Array) -> Array: ...

    def softmax(self, x: Array) -> Array: ...

    def topk(self, x: Array, k: int) -> tuple[Array, Array]: ...  # values, indices; largest first

    def sort_descending(self, x: Array) -> tuple[Array, Array]: ...

    def scatter(self, x: Array, index: Array, values: Array) -> Array: ...  # copy, values at index

    def where(self, mask: Array, value: float, x: Array) -> Array: ...  # value where mask, else x

    def stack(self, xs: list[Array]) -> Array: ...

    def concat(self, xs: list[Array]) -> Array: ...  # along the first axis

    def repeat_rows(self, x: Array, n: int) -> Array: ...  # each row n times, side by side

    def pick(self, x: Array, index: Array) -> Array: ...  # x[i, index[i]] of each row i

    def multinomial(self, probs: Array, generator) -> Array: ...  # one word per row, drawn ~ probs


class NumpyOps:
    """ArrayOps on numpy arrays: the ONNX Runtime engine's."""

    @staticmethod
    def asarray(values, dtype: str) -> np.ndarray:
        return np.asarray(values, dtype=dtype)

    @staticmethod
    def cast(x: np.ndarray, dtype: str) -> np.ndarray:
        return x.astype(dtype)

    @staticmethod
    def log_softmax(x: np.ndarray) -> np.ndarray:
        shifted = x - x.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    @staticmethod
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    @staticmethod
    def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.argpartition(-x, k - 1, axis=-1)[..., :k]
        index = np.take_along_axis(index, np.argsort(-np.take_along_axis(x, index, -1), -1,
                                                     kind="stable"), -1)
        return np.take_along_axis(x, index, -1), index

    @staticmethod
    def sort_descending(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.argsort(-x, -1, kind="stable")
        return np.take_along_axis(x, index, -1), index

    @staticmethod
    def scatter(x: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = x.copy()
        np.put_along_axis(out, index, values, -1)
        return out

    @staticmethod
    def where(mask: np.ndarray, value: float, x: np.ndarray) -> np.ndarray:
        return np.where(mask, np.asarray(value, dtype=x.dtype), x)

    @staticmethod
    def stack(xs: list[np.ndarray]) -> np.ndarray:
        return np.stack(xs)

    @staticmethod
    def concat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs)

    @staticmethod
    def repeat_rows(x: np.ndarray, n: int) -> np.ndarray:
        return np.repeat(x, n, axis=0)

    @staticmethod
    def pick(x: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, index[:, None], -1)[:, 0]

    def multinomial(self, probs: np.ndarray, generator: np.random.Generator | None) -> np.ndarray:
        if generator is not None and not isinstance(generator, np.random.Generator):
            raise TypeError("sampling on numpy arrays (an export) takes a numpy Generator, "
                            f"not {type(generator)}: np.random.default_rng(seed)")
        return inverse_cdf(self, probs,
                           generator if generator is not None else np.random.default_rng())



def array_ops(x: Array) -> ArrayOps:
    """The ArrayOps of x's kind: NumpyOps for a numpy array, TorchOps on x's device for a tensor."""
    if isinstance(x, np.ndarray):
        return NumpyOps()
    from .torch_ops import TorchOps  # x is a tensor, so torch is imported already

    return TorchOps(x.device)
