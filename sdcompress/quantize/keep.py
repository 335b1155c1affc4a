"""Which tensors stay at the source precision: the default keep-list and `--keep PATTERN`.

Names are the U-Net's original (LDM/SGM) names without `model.diffusion_model.`, the
names ComfyUI, Forge and ComfyUI-GGUF use, so a pattern a user copies from a loader's
log works here. The defaults are what every loader's reference conversion keeps
(embeddings, the first and last convolution, norms, biases, tiny tensors): they cost
almost nothing to keep and their error reaches every output pixel.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

SMALL = 1024
"""Tensors with at most this many elements stay unquantized (ComfyUI-GGUF's reference patch keeps them too)."""

DEFAULT_PREFIXES = (
    "time_embed.",  # timestep embedding MLP
    "label_emb.",  # SDXL's size/crop ("add") embedding
    "input_blocks.0.0.",  # conv_in
    "out.2.",  # conv_out
)


@dataclass(frozen=True)
class KeepList:
    """The default keep-list plus the user's `--keep` patterns (fnmatch globs; a plain word matches inside a name)."""

    patterns: tuple[str, ...] = ()
    forced: frozenset[str] = field(default_factory=frozenset)  # tensors the allocation keeps on top

    def reason(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        """Why `name` stays unquantized (a short phrase), or None when it is quantized."""
        if not dtype.is_floating_point:
            return "not floating point"
        if len(shape) < 2:
            return "bias or norm (1-D)"
        if "norm" in layer_of(name).rsplit(".", 1)[-1]:
            return "norm"
        n = 1
        for d in shape:
            n *= d
        if n <= SMALL:
            return f"small (<= {SMALL} values)"
        if name.startswith(DEFAULT_PREFIXES):
            return "embedding or conv in/out"
        for p in self.patterns:
            if _matches(p, name):
                return f"--keep {p}"
        if name in self.forced:
            return "kept by the allocation"
        return None

    def keeps(self, name: str, t: torch.Tensor) -> bool:
        """The `keep(name, t)` callable the writers take: True means store unquantized."""
        return self.reason(name, tuple(t.shape), t.dtype) is not None

    def with_forced(self, names: Iterable[str]) -> KeepList:
        return KeepList(self.patterns, self.forced | frozenset(names))


def _matches(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def layer_of(name: str) -> str:
    """`input_blocks.1.1.proj_in.weight` -> `input_blocks.1.1.proj_in` (what the allocation keeps)."""
    return name.rsplit(".", 1)[0]
