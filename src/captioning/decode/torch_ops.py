"""The search's array operations on torch tensors (`arrays.NumpyOps`' twin), on one device."""
from __future__ import annotations

import numpy as np
import torch

from .draw import inverse_cdf


class TorchOps:
    """The search's array operations (decoding.NumpyOps, on tensors): new tensors go on `device`."""

    def __init__(self, device: torch.device):
        self.device = device

    def _dtype(self, name: str) -> torch.dtype:
        return (torch.float32 if name == "float64" and self.device.type == "mps"  # no fp64
                else getattr(torch, name))

    def asarray(self, values, dtype: str) -> torch.Tensor:
        return torch.tensor(values, dtype=self._dtype(dtype), device=self.device)

    def cast(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        return x.to(self._dtype(dtype), copy=True)

    @staticmethod
    def log_softmax(x: torch.Tensor) -> torch.Tensor:
        return x.log_softmax(-1)

    @staticmethod
    def softmax(x: torch.Tensor) -> torch.Tensor:
        return x.softmax(-1)

    @staticmethod
    def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x.topk(k, dim=-1))

    @staticmethod
    def sort_descending(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x.sort(dim=-1, descending=True, stable=True))    # ties in index order

    @staticmethod
    def scatter(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return x.scatter(-1, index, values)

    @staticmethod
    def where(mask: torch.Tensor, value: float, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(mask, value)

    @staticmethod
    def stack(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs)

    @staticmethod
    def concat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs)

    @staticmethod
    def repeat_rows(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.repeat_interleave(n, 0)

    @staticmethod
    def pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(-1, index[:, None])[:, 0]

    def multinomial(self, probs: torch.Tensor, generator) -> torch.Tensor:
        """One word per row of probs (N, V): torch's own draw with a torch.Generator (None: torch's
        global one); with a numpy Generator, the inverse transform both engines draw alike."""
        if isinstance(generator, np.random.Generator):
            return inverse_cdf(self, probs, generator)
        return torch.multinomial(
            probs.cpu() if generator is not None and generator.device.type == "cpu" else probs, 1,
            generator=generator).squeeze(1).to(probs.device)
