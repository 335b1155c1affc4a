"""Which layers must stay at higher precision, measured: per-layer sensitivity and the allocation.

A layer's sensitivity is the U-Net's output error (relative L2 over fixed calibration prompts
x timesteps) when that layer alone is quantized: what a loader will compute, one layer at a
time, against the source. `--fast` uses the weight's own relative quantization error instead
(no forward passes). The allocation then keeps the most sensitive layers at the source
precision until `--budget` (file size) or `--max-error` (output error) is met.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import StateDict
from sdcompress.errors import SdcError
from sdcompress.prune.importance import predict

Roundtrip = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[str, int, int], None]


def weight_scores(sd: StateDict, names: list[str], roundtrip: Roundtrip) -> dict[str, float]:
    """`--fast`: each weight's relative quantization error ||q(w) - w|| / ||w|| (the SNR proxy)."""
    out = {}
    for name in names:
        w = sd[name].load().float()
        norm = float(w.norm())
        out[name] = float((roundtrip(w) - w).norm()) / norm if norm > 0 else 0.0
    return out


def output_scores(
    model: Model,
    names: dict[str, str],
    roundtrip: Roundtrip,
    inputs,  # noqa: ANN001 - a prune.importance.Calibration
    *,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Output error with each weight alone quantized; `names` maps original -> diffusers names."""
    from sdcompress.quantize.report import OutputError, unet_module

    unet = unet_module(model)
    reference = predict(unet, inputs, 2)
    params = dict(unet.named_parameters())
    out = {}
    for i, (name, diff_name) in enumerate(names.items()):
        p = params[diff_name]
        original = p.data
        p.data = roundtrip(original)
        try:
            out[name] = OutputError.between(predict(unet, inputs, 2), reference).relative
        finally:
            p.data = original
        if progress is not None:
            progress("scoring layers", i + 1, len(names))
    return out


@dataclass
class Allocation:
    kept: list[str]  # weights the allocation keeps at source precision, the most error per byte first
    estimated_size: int
    estimated_error: float | None  # sqrt of the sum of the quantized layers' squared scores


def estimate_error(scores: dict[str, float], kept: set[str]) -> float:
    """Layer errors add roughly as independent noise: the root of the sum of squares."""
    return math.sqrt(sum(s * s for n, s in scores.items() if n not in kept))


def allocate(
    scores: dict[str, float],
    saving: dict[str, int],
    smallest: int,
    *,
    budget: int | None,
    max_error: float | None,
) -> Allocation:
    """Keep layers at source precision, the most error removed per byte first, until the budget
    is spent or the error is met.

    `smallest` is the file size with only the keep-list kept; `saving[name]` what quantizing
    that weight saves. The estimated error is the root of the sum of the quantized layers'
    squared scores, so keeping a layer removes score**2 for saving bytes: ranking by that ratio
    is the greedy answer to the knapsack (ranking by score alone spends a budget on one large
    layer where several small ones remove more error). With `budget`, a layer is kept when it
    still fits; with `max_error`, layers are kept until the estimated error is at most the target.
    """
    order = sorted(scores, key=lambda n: -(scores[n] ** 2) / max(saving[n], 1))
    kept: list[str] = []
    size = smallest
    if budget is not None:
        if budget < smallest:
            raise SdcError(
                f"--budget {budget / 1e6:.1f} MB is smaller than the file with only the keep-list kept "
                f"({smallest / 1e6:.1f} MB); raise --budget or drop --keep patterns."
            )
        for name in order:
            if size + saving[name] <= budget:
                kept.append(name)
                size += saving[name]
    if max_error is not None:
        for name in order:
            if estimate_error(scores, set(kept)) <= max_error:
                break
            if name not in kept and (budget is None or size + saving[name] <= budget):
                kept.append(name)
                size += saving[name]
    return Allocation(kept, size, estimate_error(scores, set(kept)))
