"""What architecture code needs to know of a tensor: its shape, never its values.

Counting parameters and reading a config off a state dict look at shapes
only, so `arch` takes anything with a `shape` and a `numel` (the checkpoint
layer's lazy tensors, or `TensorSpec` for modules built on the meta device)
and stays below the checkpoint layer instead of importing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class Shaped(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def numel(self) -> int: ...


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and dtype without its values (a parameter of a meta-device module)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)
