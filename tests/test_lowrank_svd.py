"""Randomized truncated SVD: exactness at full rank, near-optimal error at rank R."""

import pytest
import torch

from sdcompress.lowrank.svd import as_matrix, low_rank, low_rank_batch, low_rank_many


def _decaying(m: int, n: int, decay: float = 0.9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (u * s) @ v.T


def _optimal_sq_error(a: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(a.double())
    return float((s[rank:] ** 2).sum())


def test_full_rank_reproduces_the_matrix():
    a = torch.randn(40, 30)
    lr = low_rank(a, 30)
    torch.testing.assert_close(lr.up @ lr.down, a, atol=1e-4, rtol=1e-4)
    assert lr.sq_error() < 1e-6 * lr.energy


def test_full_rank_conv_weight_is_flattened():
    w = torch.randn(16, 8, 3, 3)
    lr = low_rank(w, 16)
    assert lr.up.shape == (16, 16) and lr.down.shape == (16, 72)
    torch.testing.assert_close((lr.up @ lr.down).reshape(w.shape), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("m", "n", "rank", "decay"), [(200, 300, 8, 0.9), (320, 180, 16, 0.95), (256, 256, 4, 0.8)]
)
def test_randomized_error_within_one_percent_of_optimal(m, n, rank, decay):
    a = _decaying(m, n, decay, seed=m) + 1e-3 * torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    lr = low_rank_batch(a.unsqueeze(0), rank, exact_min_dim=0)[0]  # force the randomized path
    approx = lr.up @ lr.down
    err = float(((a.double() - approx.double()) ** 2).sum())
    opt = _optimal_sq_error(a, rank)
    assert err <= 1.01 * opt
    # the reported error is the true one
    assert lr.sq_error() == pytest.approx(err, rel=1e-3)


def _finetune_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A rank-8 structure over a flat noise floor, as benchmarks/extract.py makes: the hard case."""
    g = torch.Generator().manual_seed(seed)
    d = 0.02 * (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) / (8 * n) ** 0.5
    return d + 2e-4 * torch.randn(m, n, generator=g)


@pytest.mark.parametrize(
    ("m", "n", "exact_min_dim"),
    [(320, 320, None), (320, 768, None), (768, 320, None), (640, 640, 0), (1280, 1280, 0)],
)
def test_flat_tail_error_within_one_percent_of_optimal(m, n, exact_min_dim):
    """SD layer shapes at rank 32 on a fine-tune-like diff; exact_min_dim=0 forces the randomized path."""
    a = _finetune_like(m, n, seed=m + n)
    kwargs = {} if exact_min_dim is None else {"exact_min_dim": exact_min_dim}
    lr = low_rank_batch(a.unsqueeze(0), 32, **kwargs)[0]
    err = float(((a.double() - (lr.up @ lr.down).double()) ** 2).sum())
    assert err <= 1.01 * _optimal_sq_error(a, 32)
    assert lr.sq_error() == pytest.approx(err, rel=1e-3)


def test_rank_is_clamped_to_the_smallest_dimension():
    lr = low_rank(torch.randn(5, 12), 64)
    assert lr.rank == 5


def test_many_batches_groups_and_keeps_order():
    ws = [torch.randn(20, 10), torch.randn(12, 4, 3, 3), torch.randn(20, 10)]
    out = low_rank_many(ws, [10, 12, 3])
    assert [o.rank for o in out] == [10, 12, 3]
    torch.testing.assert_close(out[0].up @ out[0].down, ws[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1].up @ out[1].down, as_matrix(ws[1]), atol=1e-4, rtol=1e-4)


def test_fp16_storage_is_computed_in_fp32():
    a = torch.randn(30, 20).half()
    lr = low_rank(a, 20)
    assert lr.up.dtype == torch.float32
    torch.testing.assert_close(lr.up @ lr.down, a.float(), atol=1e-3, rtol=1e-3)


def test_exact_fallback_when_randomized_fails(monkeypatch):
    import sdcompress.lowrank.svd as svd

    def boom(*a, **k):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(svd, "_randomized", boom)
    a = _decaying(150, 120)
    lr = low_rank_batch(a.unsqueeze(0), 5, exact_min_dim=0)[0]
    assert lr.sq_error() == pytest.approx(_optimal_sq_error(a, 5), rel=1e-3, abs=1e-6)
