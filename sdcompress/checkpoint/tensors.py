"""Lazy tensors: a name, a shape, a dtype, and a way to get the values later.

Checkpoints are gigabytes, and most jobs (convert, prune with a preset, merge)
touch one tensor at a time. A `LazyTensor` knows its shape and dtype without
reading any data and, when its bytes sit unchanged in a safetensors file, where
they are (`raw`), so a writer can copy them with the kernel instead of through
Python. Reshapes and row slices of such a tensor keep `raw`; anything that
changes the bytes drops it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RawRange:
    """`nbytes` bytes at `offset` of the file at `path`, laid out exactly as the tensor's values."""

    path: str
    offset: int
    nbytes: int


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    raw: tuple[RawRange, ...] | None = field(default=None, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    def load(self) -> torch.Tensor:
        return self.loader()

    @classmethod
    def of(cls, tensor: torch.Tensor) -> LazyTensor:
        """Wrap a tensor that is already in memory (or on the meta device)."""
        return cls(tuple(tensor.shape), tensor.dtype, lambda: tensor)

    def reshaped(self, shape: Sequence[int]) -> LazyTensor:
        shape = tuple(shape)
        if math.prod(shape) != self.numel:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return LazyTensor(shape, self.dtype, lambda: self.load().reshape(shape), self.raw)

    def rows(self, start: int, stop: int) -> LazyTensor:
        """Rows `start:stop` of dimension 0 (e.g. q, k or v of a fused projection)."""
        shape = (stop - start, *self.shape[1:])
        raw = None
        if self.raw is not None and len(self.raw) == 1:
            row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
            r = self.raw[0]
            raw = (RawRange(r.path, r.offset + start * row_bytes, (stop - start) * row_bytes),)
        return LazyTensor(shape, self.dtype, lambda: self.load()[start:stop], raw)

    def transposed(self) -> LazyTensor:
        if len(self.shape) != 2:
            raise ValueError("transposed() needs a 2-D tensor")
        return LazyTensor(self.shape[::-1], self.dtype, lambda: self.load().t().contiguous())

    def to_dtype(self, dtype: torch.dtype | None) -> LazyTensor:
        if dtype is None or dtype == self.dtype:
            return self
        return LazyTensor(self.shape, dtype, lambda: self.load().to(dtype))


def concat_rows(parts: Sequence[LazyTensor]) -> LazyTensor:
    """Concatenate along dimension 0 without reading (q, k, v into a fused projection)."""
    first = parts[0]
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
        raise ValueError("concat_rows needs parts of one dtype and matching trailing shape")
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    raw = None
    if all(p.raw is not None for p in parts):
        raw = tuple(r for p in parts for r in p.raw)  # type: ignore[union-attr]
    return LazyTensor(shape, first.dtype, lambda: torch.cat([p.load() for p in parts]), raw)


StateDict = dict[str, LazyTensor]
"""Name -> lazy tensor, in a stable order. The unit every mapping and writer works on."""


def lazy_state_dict(tensors: dict[str, torch.Tensor]) -> StateDict:
    return {k: LazyTensor.of(v) for k, v in tensors.items()}


def materialize(sd: StateDict) -> dict[str, torch.Tensor]:
    return {k: v.load() for k, v in sd.items()}
