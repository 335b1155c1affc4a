"""Merge arithmetic as small pure functions over tensors, registered by name.

Each method takes the tensors of one key from every input (fp32) and returns
the merged tensor; the merge service streams a model through it key by key, so
memory stays near one tensor per input whatever the model size. A new method
is one decorated function; the keyword parameters it declares are the options
it takes, and the merge refuses any other (a `--density` given to a weighted
sum is an error, not silently dropped).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sdcompress.choices import MergeMethod as MethodName
from sdcompress.errors import SdcError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    n_models: tuple[int, int]  # min, max number of inputs
    doc: str
    params: tuple[str, ...]  # the keyword options it takes (alpha, density, seed)

    def check_params(self, given: dict[str, object]) -> None:
        """Refuse options this method has no use for, in one sentence naming them."""
        extra = [name for name, value in given.items() if value is not None and name not in self.params]
        if extra:
            takes = ", ".join(f"--{p}" for p in self.params if p in USER_PARAMS) or "no options"
            flags = " and ".join(f"--{p}" for p in extra)
            raise SdcError(f"--method {self.name} does not use {flags} (it takes {takes}); drop it.")


METHODS: dict[str, MergeMethod] = {}
USER_PARAMS = ("alpha", "density", "seed")  # the options a method may declare; others are internal


def merge_method(name: str, n_models: tuple[int, int]) -> Callable[[Callable[..., torch.Tensor]], Callable]:
    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        params = tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        METHODS[name] = MergeMethod(MethodName(name), fn, n_models, doc, params)  # the CLI lists MethodName
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    return METHODS[MethodName.parse(name, "--method")]


@merge_method("weighted-sum", (2, 2))
def weighted_sum(tensors: Sequence[torch.Tensor], *, alpha: float = 0.5) -> torch.Tensor:
    """A * (1 - alpha) + B * alpha."""
    a, b = tensors
    return torch.lerp(a, b, alpha)


@merge_method("add-difference", (3, 3))
def add_difference(tensors: Sequence[torch.Tensor], *, alpha: float = 1.0) -> torch.Tensor:
    """A + (B - C) * alpha: transplant what B learned on top of C into A."""
    a, b, c = tensors
    return a + (b - c) * alpha


def _task_vectors(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    base = tensors[0]
    return base, torch.stack([t - base for t in tensors[1:]])


def _trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` share of each task vector by magnitude, zero the rest.

    The threshold is the k-th largest |value|, taken with `torch.kthvalue`
    (`torch.quantile` refuses tensors over 2**24 elements).
    """
    if density >= 1:
        return deltas
    flat = deltas.reshape(deltas.shape[0], -1)
    n = flat.shape[1]
    k = max(1, int(round(density * n)))
    thresh = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
    return torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat)).reshape(deltas.shape)


@merge_method("ties", (2, 16))
def ties(tensors: Sequence[torch.Tensor], *, alpha: float = 1.0, density: float = 0.2) -> torch.Tensor:
    """TIES: base + alpha * disjoint mean of trimmed task vectors that agree with the elected sign."""
    base, deltas = _task_vectors(tensors)
    deltas = _trim(deltas, density)
    sign = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    count = agree.sum(0).clamp(min=1)
    merged = (deltas * agree).sum(0) / count
    return base + alpha * merged


@merge_method("dare", (2, 16))
def dare(
    tensors: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    density: float = 0.1,
    seed: int = 0,
    key_index: int = 0,
) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 - density, rescale the rest by 1/density, sum."""
    if not 0 < density <= 1:
        raise SdcError(f"--density must be in (0, 1], got {density}.")
    base, deltas = _task_vectors(tensors)
    g = torch.Generator().manual_seed(seed * 1_000_003 + key_index)
    keep = torch.rand(deltas.shape, generator=g) < density
    return base + alpha * (deltas * keep).sum(0) / density


def lora_delta(
    up: torch.Tensor, down: torch.Tensor, scale: float, mid: torch.Tensor | None = None
) -> torch.Tensor:
    """up @ down * scale as a flat [out, in*kh*kw] matrix, for linears, 1x1 and kxk convs.

    A conv LoRA is two convolutions: down [r, in, kh, kw] then up [out, r, 1, 1];
    composing them is a matrix product over the flattened kernels. With a
    LoCon Tucker core `mid` [r, r, kh, kw] (down and up are then 1x1) the
    kernel is sum_ab up[o, a] mid[a, b, h, w] down[b, i].
    """
    u = up.reshape(up.shape[0], -1).float()
    d = down.reshape(down.shape[0], -1).float()
    if mid is None:
        return (u @ d) * scale
    w = torch.einsum("oa,abhw,bi->oihw", u, mid.float(), d)
    return w.reshape(w.shape[0], -1) * scale


def weight_decompose(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, on_output: bool, multiplier: float
) -> torch.Tensor:
    """DoRA baked: (W + dW) rescaled so each output (or input) channel has norm `magnitude`.

    peft's DoRA keeps one magnitude per output channel and normalises each row
    of W + dW over every other axis (the input and kernel axes of a conv);
    LyCORIS's older files keep one per input channel. A `multiplier` other than
    1 moves from W towards the DoRA weight, as ComfyUI applies a strength
    (peft has no such knob; LyCORIS's merge keeps all of dW and scales only the
    rescaling, so it agrees at 1 only).
    """
    w = weight + delta
    if on_output:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
    # eps as LyCORIS adds it: a zero row stays zero instead of becoming NaN
    merged = w * (magnitude.reshape(norm.shape) / (norm + torch.finfo(w.dtype).eps))
    return merged if multiplier == 1 else weight + (merged - weight) * multiplier
