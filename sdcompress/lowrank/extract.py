"""LoRA extraction: low-rank factors of (tuned - base), one layer at a time.

Layers stream from the two models' lazy state dicts: one pair of tensors is
in memory at a time (a few on a GPU, where same-shaped layers are batched),
and only the factors, at the largest rank that may be kept, stay behind. Ranks
are chosen afterwards, so the size budget can weigh every layer's spectrum at
once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from sdcompress.checkpoint.tensors import StateDict, dtype_size
from sdcompress.choices import RankMode
from sdcompress.errors import SdcError
from sdcompress.lowrank.layouts import LoraModule, shape_factors
from sdcompress.lowrank.rank import BudgetLayer, clamp_rank, max_rank, rank_by_rule, ranks_for_budget
from sdcompress.lowrank.svd import LowRank, as_matrix, low_rank_batch
from sdcompress.lowrank.targets import TE, TE2, UNET, Target, is_conv_kernel, is_target

GPU_BATCH = 16
# The size budget is for the whole file: the safetensors header costs about this
# much per module (three JSON entries with ~80-character names) plus the metadata.
HEADER_BYTES_PER_MODULE = 3 * 160
HEADER_BYTES_FIXED = 8192


@dataclass(frozen=True)
class ExtractOptions:
    rank: int | None = None  # fixed rank, or the cap for --mode and --size-budget (default: `max_rank`)
    conv_rank: int | None = None  # rank of 3x3 convs; None leaves them out
    mode: RankMode = RankMode.FIXED
    mode_param: float | None = None
    size_budget: int | None = None  # bytes
    text_encoder: bool = True
    clamp_quantile: float | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float16  # storage dtype of the output: sets bytes per rank for the budget
    seed: int = 0

    def __post_init__(self) -> None:
        mode = RankMode.parse(self.mode, "--mode")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "rank", max_rank(self.rank, mode, self.size_budget))
        if self.conv_rank is not None and self.conv_rank < 1:
            raise SdcError(f"--conv-rank must be at least 1, got {self.conv_rank}.")


@dataclass
class LayerResult:
    target: Target
    shape: tuple[int, ...]
    rank: int
    requested: int
    clamped: bool
    energy: float  # squared Frobenius norm of the difference
    sq_error: float  # squared Frobenius error of the kept factors

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.sq_error / self.energy) if self.energy > 0 else 0.0

    @property
    def retained(self) -> float:
        return 1.0 - self.sq_error / self.energy if self.energy > 0 else 1.0


@dataclass
class Extraction:
    modules: list[LoraModule]
    layers: list[LayerResult]
    unchanged: list[Target] = field(default_factory=list)


Progress = Callable[[str, int, int], None]


def check_same_architecture(
    base: Mapping[str, StateDict], tuned: Mapping[str, StateDict], components: list[str]
) -> None:
    """Same keys and shapes in every compared component; else name the first layer that differs."""
    for c in components:
        if (c in base) != (c in tuned):
            which = "the base" if c in base else "the tuned model"
            raise SdcError(f"only {which} has a {c}; extract from two models of the same architecture.")
        if c not in base:
            continue
        b, t = base[c], tuned[c]
        for key in list(b) + [k for k in t if k not in b]:
            if key not in b or key not in t:
                side = "base" if key in b else "tuned"
                raise SdcError(
                    f"the models differ in architecture: {c}.{key} exists only in the {side} model; "
                    "extract from two models of the same architecture."
                )
            if b[key].shape != t[key].shape:
                raise SdcError(
                    f"the models differ in architecture: {c}.{key} is {list(b[key].shape)} in the base and "
                    f"{list(t[key].shape)} in the tuned model; extract from two models of one architecture."
                )


def list_targets(
    base: Mapping[str, StateDict], options: ExtractOptions
) -> list[tuple[Target, tuple[int, ...]]]:
    components = [UNET] + ([TE, TE2] if options.text_encoder else [])
    out = []
    for c in components:
        for key, lt in base.get(c, {}).items():
            if is_target(c, key, lt.shape, options.conv_rank is not None):
                out.append((Target(c, key.removesuffix(".weight")), lt.shape))
    return out


def _cap(shape: tuple[int, ...], options: ExtractOptions) -> int:
    """The largest rank a layer may get: the conv rank for spatial kernels, else the rank."""
    if is_conv_kernel(shape):
        return options.conv_rank or 0
    return options.rank


def extract(
    base: Mapping[str, StateDict],
    tuned: Mapping[str, StateDict],
    options: ExtractOptions,
    progress: Progress | None = None,
) -> Extraction:
    """Factor every changed target layer, then choose ranks and build the modules."""
    components = [UNET] + ([TE, TE2] if options.text_encoder else [])
    check_same_architecture(base, tuned, components)
    targets = list_targets(base, options)
    if not targets:
        raise SdcError(
            "the models have no layers a LoRA can adapt; check that they are Stable Diffusion models."
        )
    batch = GPU_BATCH if torch.device(options.device).type == "cuda" else 1
    factors: dict[Target, LowRank] = {}
    unchanged: list[Target] = []
    pending: list[tuple[Target, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        shape = pending[0][1].shape
        cap = min(_cap(tuple(shape), options), *as_matrix(pending[0][1]).shape)
        stack = torch.stack([as_matrix(d) for _, d in pending]).to(options.device)
        for (t, _), lr in zip(pending, low_rank_batch(stack, cap, seed=options.seed), strict=True):
            factors[t] = lr
        pending.clear()

    for i, (target, _) in enumerate(targets):
        if progress:
            progress(target.component + "." + target.path, i, len(targets))
        key = target.weight_key
        b = base[target.component][key].load()
        t = tuned[target.component][key].load()
        if torch.equal(b, t):
            unchanged.append(target)
            continue
        diff = t.float() - b.float()
        del b, t
        if pending and (pending[0][1].shape != diff.shape or len(pending) >= batch):
            flush()
        pending.append((target, diff))
        if batch == 1:
            flush()
    flush()
    if progress:
        progress("", len(targets), len(targets))
    if not factors:
        raise SdcError(
            "nothing changed: the two models have identical weights in every layer a LoRA can adapt; "
            "pass the fine-tuned model as TUNED."
        )
    return _finish(factors, dict(targets), unchanged, options)


def _choose_ranks(
    factors: dict[Target, LowRank], shapes: dict[Target, tuple[int, ...]], options: ExtractOptions
):
    if options.size_budget is not None:
        el = dtype_size(options.dtype)
        fixed = el + HEADER_BYTES_PER_MODULE
        layers = [
            BudgetLayer(lr.s, (shapes[t][0] + math.prod(shapes[t][1:])) * el, fixed)
            for t, lr in factors.items()
        ]
        budget = options.size_budget - HEADER_BYTES_FIXED
        if budget <= 0:
            raise SdcError(
                f"--size-budget {options.size_budget} bytes is too small for a LoRA file; allow more."
            )
        return dict(zip(factors, ranks_for_budget(layers, budget), strict=True))
    out = {}
    for t, lr in factors.items():
        cap = _cap(shapes[t], options)
        out[t] = rank_by_rule(lr.s, lr.energy, options.mode, options.mode_param, cap)
    return out


def _finish(
    factors: dict[Target, LowRank],
    shapes: dict[Target, tuple[int, ...]],
    unchanged: list[Target],
    options: ExtractOptions,
) -> Extraction:
    ranks = _choose_ranks(factors, shapes, options)
    modules, layers = [], []
    for t, lr in factors.items():
        shape = shapes[t]
        choice = clamp_rank(_cap(shape, options), shape)
        rank = min(ranks[t], choice.rank)
        layers.append(
            LayerResult(t, shape, rank, choice.requested, choice.clamped, lr.energy, lr.sq_error(rank))
        )
        if rank == 0:
            continue
        kept = lr.truncated(rank)
        up, down = kept.up, kept.down
        if options.clamp_quantile is not None:
            up, down = clamp_to_quantile(up, down, options.clamp_quantile)
            layers[-1].sq_error = _sq_error_of(up, down, lr, factors_rank=rank)
        up, down = shape_factors(up, down, shape)
        modules.append(LoraModule(t, up.contiguous(), down.contiguous(), float(rank)))
    return Extraction(modules, layers, unchanged)


def _sq_error_of(up: torch.Tensor, down: torch.Tensor, lr: LowRank, factors_rank: int) -> float:
    """Error of clamped factors: |D|^2 - |P D|^2 + |P D - U' V'|^2, P D being the unclamped rank-r product."""
    exact = lr.truncated(factors_rank)
    drift = float(((exact.up @ exact.down - up @ down).double() ** 2).sum())
    return exact.sq_error() + drift


def clamp_to_quantile(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's clamp: both factors to the q-quantile of their joint values, via kthvalue (no 2**24 limit)."""
    if not 0 < q <= 1:
        raise SdcError(f"--clamp-quantile must be in (0, 1], got {q}.")
    values = torch.cat([up.reshape(-1), down.reshape(-1)])
    k = max(1, min(values.numel(), math.ceil(q * values.numel())))
    hi = float(values.kthvalue(k).values)
    if hi <= 0:
        return up, down
    return up.clamp(-hi, hi), down.clamp(-hi, hi)
