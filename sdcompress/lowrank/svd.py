"""Truncated SVD of weight differences: randomized, batched, with exact fallbacks.

Extraction needs the top R singular triplets of a few hundred matrices, not
all of them. A full `torch.linalg.svd` of a 1280x11520 matrix takes a minute
on a small CPU; a randomized range finder with four power iterations gets the
top 32 triplets in under half a second and lands within ~0.6% of the optimal
residual (Halko, Martinsson and Tropp, 2011). `torch.svd_lowrank` exists but
re-orthonormalises only once per iteration pair, does not batch over stacked
matrices, and gives no fallback when LAPACK fails to converge, which happens
on ill-conditioned fine-tune diffs; hence this module.

All math is fp32 (or fp64 on the fallback path) whatever the storage dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

OVERSAMPLE = 8
# Fine-tune diffs are a few strong directions over a flat noise floor; picking
# the top R out of a flat tail is the randomized method's hardest case. On such
# diffs (benchmarks/extract.py) two iterations leave 640x640 at 1.018x and
# 320x320 at 1.027x the optimal squared error; four keep every SD layer shape
# above EXACT_MIN_DIM within 1.008x.
POWER_ITERS = 4
# Up to this min dimension an exact SVD costs at most ~0.06 s (320x2880 on one
# core) and has no error, so small layers skip the randomized path; likewise
# when the requested rank is close to full.
EXACT_MIN_DIM = 320
EXACT_RANK_FRACTION = 0.5


@dataclass
class LowRank:
    """`up @ down` approximates the matrix; `s` are the leading singular values.

    `up` is [out, r] (U_r * S_r), `down` is [r, in] (Vh_r), both fp32.
    `energy` is the squared Frobenius norm of the whole matrix, so the squared
    error of the rank-k truncation is `energy - sum(s[:k] ** 2)` (exact: the
    approximation is an orthogonal projection of the matrix).
    """

    up: torch.Tensor
    down: torch.Tensor
    s: torch.Tensor
    energy: float

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def truncated(self, rank: int) -> LowRank:
        return LowRank(self.up[:, :rank], self.down[:rank], self.s[:rank], self.energy)

    def sq_error(self, rank: int | None = None) -> float:
        k = self.rank if rank is None else rank
        return max(self.energy - float((self.s[:k].double() ** 2).sum()), 0.0)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a 2-D matrix: conv [out, in, kh, kw] -> [out, in*kh*kw]."""
    return weight.reshape(weight.shape[0], -1) if weight.ndim != 2 else weight


def _exact(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact reduced SVD, retried in fp64 (and with the gesvd driver on CUDA) when it fails."""
    attempts: list[tuple[torch.dtype, str | None]] = [(torch.float32, None), (torch.float64, None)]
    if a.is_cuda:
        attempts.append((torch.float64, "gesvd"))
    if a.shape[-1] > a.shape[-2]:  # LAPACK decomposes tall matrices 2-3x faster than wide ones
        v, s, ut = _exact(a.transpose(-1, -2), rank)
        return ut.transpose(-1, -2), s, v.transpose(-1, -2)
    last: Exception | None = None
    for dtype, driver in attempts:
        try:
            u, s, vh = torch.linalg.svd(a.to(dtype), full_matrices=False, driver=driver)
        except (torch.linalg.LinAlgError, RuntimeError) as exc:  # no convergence
            last = exc
            continue
        if torch.isfinite(s).all():
            return u[..., :rank].float(), s[..., :rank].float(), vh[..., :rank, :].float()
    raise RuntimeError(f"SVD did not converge even in float64: {last}")


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of a tall [m, k] matrix.

    The left singular vectors rather than QR: on CPU builds of torch the
    Householder QR of a tall-skinny matrix (11520x40) takes ~0.9 s, its reduced
    SVD ~0.03 s, and the SVD basis stays orthonormal when `y` is rank-deficient.
    """
    return torch.linalg.svd(y, full_matrices=False).U


def _randomized(
    a: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range finder with power iterations; QR after every product keeps it stable in fp32."""
    m, n = a.shape[-2:]
    k = min(rank + oversample, m, n)
    omega = torch.randn((*a.shape[:-2], n, k), device=a.device, dtype=a.dtype, generator=generator)
    q = _orthonormal(a @ omega)
    at = a.transpose(-1, -2)
    for _ in range(power_iters):
        q = _orthonormal(at @ q)
        q = _orthonormal(a @ q)
    b = q.transpose(-1, -2) @ a  # [k, n]
    ub, s, vh = _exact(b, rank)
    return q @ ub, s, vh


def _use_exact(m: int, n: int, rank: int, exact_min_dim: int) -> bool:
    small = min(m, n)
    return small <= exact_min_dim or rank + OVERSAMPLE >= EXACT_RANK_FRACTION * small


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def low_rank_batch(
    matrices: torch.Tensor,
    rank: int,
    *,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    exact_min_dim: int = EXACT_MIN_DIM,
    seed: int = 0,
) -> list[LowRank]:
    """Rank-`rank` factors of each matrix in a [B, m, n] stack, on the stack's device.

    `rank` is clamped to min(m, n). Exact SVD for small matrices and ranks
    near full; randomized otherwise, falling back to exact per matrix when the
    randomized result is not finite.
    """
    a = matrices.float()
    _, m, n = a.shape
    rank = max(1, min(rank, m, n))
    energies = torch.linalg.vector_norm(a, dim=(-2, -1)).double() ** 2
    if a.shape[0] == 1 and a.device.type == "cpu":
        # CPU LAPACK calls on a [1, m, n] batch run several times slower than on the 2-D matrix
        u, s, vh = _factor_one(a[0], rank, oversample, power_iters, exact_min_dim, seed)
        return [LowRank((u * s).contiguous(), vh.contiguous(), s, float(energies[0]))]
    if _use_exact(m, n, rank, exact_min_dim):
        u, s, vh = _exact(a, rank)
    else:
        try:
            u, s, vh = _randomized(a, rank, oversample, power_iters, _generator(a.device, seed))
        except (torch.linalg.LinAlgError, RuntimeError):
            u, s, vh = _exact(a, rank)
        bad = ~torch.isfinite(s).all(dim=-1)
        if bad.any():
            u2, s2, vh2 = _exact(a[bad], rank)
            u[bad], s[bad], vh[bad] = u2, s2, vh2
    out = []
    for i in range(a.shape[0]):
        up = (u[i] * s[i]).cpu()
        out.append(LowRank(up, vh[i].contiguous().cpu(), s[i].cpu(), float(energies[i])))
    return out


def _factor_one(
    a: torch.Tensor, rank: int, oversample: int, power_iters: int, exact_min_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = a.shape
    if _use_exact(m, n, rank, exact_min_dim):
        return _exact(a, rank)
    try:
        u, s, vh = _randomized(a, rank, oversample, power_iters, _generator(a.device, seed))
    except (torch.linalg.LinAlgError, RuntimeError):
        return _exact(a, rank)
    return (u, s, vh) if torch.isfinite(s).all() else _exact(a, rank)


def low_rank(weight: torch.Tensor, rank: int, **kwargs: object) -> LowRank:
    """Rank-`rank` factors of one weight (conv weights are flattened to [out, in*kh*kw])."""
    return low_rank_batch(as_matrix(weight).unsqueeze(0), rank, **kwargs)[0]  # type: ignore[arg-type]


def low_rank_many(
    weights: Sequence[torch.Tensor],
    ranks: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    **kwargs: object,
) -> list[LowRank]:
    """Factors for many weights, batching same-shaped matrices with the same rank on the device.

    On a GPU one batched QR/SVD over a stack of same-shaped layers is several
    times faster than a loop; on a CPU batching gains little, so callers pass
    small groups there.
    """
    dev = torch.device(device)
    results: list[LowRank | None] = [None] * len(weights)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (w, r) in enumerate(zip(weights, ranks, strict=True)):
        m = as_matrix(w)
        groups.setdefault((m.shape[0], m.shape[1], r), []).append(i)
    for (_, _, r), idx in groups.items():
        stack = torch.stack([as_matrix(weights[i]).to(dev, torch.float32) for i in idx])
        for i, lr in zip(idx, low_rank_batch(stack, r, **kwargs), strict=True):  # type: ignore[arg-type]
            results[i] = lr
        del stack
    return results  # type: ignore[return-value]
