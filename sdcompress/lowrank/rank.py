"""Choosing a rank per layer: fixed, by a spectrum rule, or jointly for a file-size budget.

The spectrum rules follow what users know from kohya's `resize_lora` and
LyCORIS (`ratio`, `energy` share, absolute `threshold`). The size budget is
new: the squared error of a rank-k truncation is the sum of the discarded
squared singular values, so adding rank k+1 to a layer buys `s_k ** 2` of
error for `(in + out) * bytes_per_element` bytes. Those gains shrink down each
layer's spectrum, so taking the best gain per byte across all layers, one rank
at a time from a max-heap, reaches the smallest total error for the budget
(up to the last rank that does not fit).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdcompress.choices import RankMode
from sdcompress.errors import SdcError
from sdcompress.lowrank.rank_defaults import BUDGET_RANK_CAP, DEFAULT_RANK

MODES = tuple(m.value for m in RankMode)


def max_rank(rank: int | None, mode: str, size_budget: int | None) -> int:
    """The rank asked for, or the default: a fixed rank of 32, or a cap of 128 when a rule or budget decides."""
    if rank is None:
        rank = BUDGET_RANK_CAP if size_budget is not None or mode != RankMode.FIXED else DEFAULT_RANK
    if rank < 1:
        raise SdcError(f"--rank must be at least 1, got {rank}.")
    return rank


@dataclass(frozen=True)
class RankChoice:
    rank: int
    requested: int
    clamped: bool


def clamp_rank(requested: int, shape: Sequence[int]) -> RankChoice:
    """A rank no larger than the layer allows (min of out and in*kh*kw); clamping is reported."""
    limit = min(shape[0], _prod(shape[1:]))
    rank = max(0, min(requested, limit))
    return RankChoice(rank, requested, rank < requested)


def _prod(xs: Sequence[int]) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def rank_by_rule(s: torch.Tensor, energy: float, mode: str, param: float | None, max_rank: int) -> int:
    """Rank for one layer from its leading singular values `s` (descending) and total energy.

    - fixed: `max_rank`;
    - ratio: keep singular values >= param * s_max (0 < param <= 1);
    - energy: the smallest rank keeping `param` of the squared Frobenius norm (0 < param <= 1);
    - threshold: keep singular values > param.
    The result never exceeds `max_rank` nor the number of values in `s`.
    """
    k = min(max_rank, int(s.shape[0]))
    if mode == "fixed" or k == 0:
        return k
    if param is None:
        raise SdcError(f"--mode {mode} needs --mode-param; e.g. --mode {mode} --mode-param {_EXAMPLE[mode]}.")
    s = s[:k].double()
    if mode == "ratio":
        _check_unit(mode, param)
        return int((s >= param * s[0]).sum())
    if mode == "energy":
        _check_unit(mode, param)
        if energy <= 0:
            return 0
        kept = torch.cumsum(s**2, 0) / energy
        reached = (kept >= param - 1e-12).nonzero()
        return int(reached[0]) + 1 if len(reached) else k
    if mode == "threshold":
        if param < 0:
            raise SdcError(
                f"--mode-param for threshold must be >= 0, got {param}; pass a singular-value cut-off."
            )
        return int((s > param).sum())
    raise SdcError(f"unknown rank mode {mode!r}; choose one of {', '.join(MODES)}.")


_EXAMPLE = {"ratio": "0.1", "energy": "0.9", "threshold": "0.05"}


def _check_unit(mode: str, param: float) -> None:
    if not 0 < param <= 1:
        raise SdcError(f"--mode-param for {mode} must be in (0, 1], got {param}.")


@dataclass(frozen=True)
class BudgetLayer:
    """One layer's leading singular values (descending) and the bytes one more rank costs."""

    s: torch.Tensor
    bytes_per_rank: int
    fixed_bytes: int = 0


def ranks_for_budget(layers: Sequence[BudgetLayer], budget_bytes: int) -> list[int]:
    """Ranks for all layers together, minimising total squared error within `budget_bytes`.

    Every layer that gets rank >= 1 also pays `fixed_bytes` (its alpha); a layer
    with rank 0 is left out of the file. Ties break on layer order, so the result
    is deterministic.
    """
    if budget_bytes <= 0:
        raise SdcError(f"--size-budget must be positive, got {budget_bytes} bytes.")
    ranks = [0] * len(layers)
    sq = [(layer.s.double() ** 2).tolist() for layer in layers]
    heap: list[tuple[float, int]] = []
    for i, layer in enumerate(layers):
        if sq[i] and sq[i][0] > 0:
            cost = layer.bytes_per_rank + layer.fixed_bytes
            heapq.heappush(heap, (-sq[i][0] / cost, i))
    left = budget_bytes
    while heap:
        _, i = heapq.heappop(heap)
        layer = layers[i]
        cost = layer.bytes_per_rank + (layer.fixed_bytes if ranks[i] == 0 else 0)
        if cost > left:
            continue  # this layer's next rank does not fit; cheaper ones still may
        left -= cost
        ranks[i] += 1
        k = ranks[i]
        if k < len(sq[i]) and sq[i][k] > 0:
            heapq.heappush(heap, (-sq[i][k] / layer.bytes_per_rank, i))
    return ranks


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'50MB' -> 50_000_000, '1.5GiB' -> bytes; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise SdcError(f"cannot read size {text!r}; write it like 50MB, 800KB or 1.5GiB.")
    return int(float(m.group(1)) * _UNITS[unit])
