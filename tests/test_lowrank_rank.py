"""Rank selection rules and the joint size-budget allocation."""

import itertools

import pytest
import torch

from sdcompress.errors import SdcError
from sdcompress.lowrank.rank import BudgetLayer, clamp_rank, parse_size, rank_by_rule, ranks_for_budget

S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
E = float((S**2).sum())


def test_clamp_reports_instead_of_failing():
    c = clamp_rank(64, (16, 8, 3, 3))
    assert (c.rank, c.clamped) == (16, True)
    assert clamp_rank(4, (16, 8)).clamped is False


def test_rules():
    assert rank_by_rule(S, E, "fixed", None, 3) == 3
    assert rank_by_rule(S, E, "ratio", 0.2, 5) == 3  # >= 2.0
    assert rank_by_rule(S, E, "threshold", 1.0, 5) == 3  # > 1.0
    assert rank_by_rule(S, E, "energy", 0.8, 5) == 2  # 100/130.25 < 0.8 <= 125/130.25
    assert rank_by_rule(S, E, "energy", 0.995, 5) == 4
    assert rank_by_rule(S, E, "ratio", 0.01, 2) == 2  # capped by max rank


def test_energy_rule_is_the_smallest_rank_reaching_the_share():
    for share in (0.5, 0.7, 0.9, 0.97, 1.0):
        k = rank_by_rule(S, E, "energy", share, 5)
        assert float((S[:k] ** 2).sum()) / E >= share - 1e-9
        assert k == 1 or float((S[: k - 1] ** 2).sum()) / E < share


def test_rule_without_param_is_a_user_error():
    with pytest.raises(SdcError, match="mode-param"):
        rank_by_rule(S, E, "energy", None, 4)
    with pytest.raises(SdcError):
        rank_by_rule(S, E, "ratio", 1.5, 4)


def _brute_force(layers, budget):
    best = None
    for ranks in itertools.product(*[range(len(lay.s) + 1) for lay in layers]):
        cost = sum(r * lay.bytes_per_rank for r, lay in zip(ranks, layers, strict=True))
        if cost > budget:
            continue
        err = sum(float((lay.s[r:] ** 2).sum()) for r, lay in zip(ranks, layers, strict=True))
        if best is None or err < best[0]:
            best = (err, ranks)
    return best


def test_budget_matches_brute_force_when_costs_are_equal():
    g = torch.Generator().manual_seed(0)
    layers = [
        BudgetLayer(torch.sort(torch.rand(4, generator=g), descending=True).values, 10) for _ in range(3)
    ]
    for budget in (10, 30, 55, 120):
        ranks = ranks_for_budget(layers, budget)
        err = sum(float((lay.s[r:] ** 2).sum()) for r, lay in zip(ranks, layers, strict=True))
        assert err == pytest.approx(_brute_force(layers, budget)[0])
        assert sum(r * 10 for r in ranks) <= budget


def test_budget_prefers_error_per_byte():
    cheap = BudgetLayer(torch.tensor([3.0, 2.0]), 10)
    dear = BudgetLayer(torch.tensor([4.0, 1.0]), 100)
    # 16 error for 100 bytes vs 9 + 4 error for 20 bytes
    assert ranks_for_budget([cheap, dear], 30) == [2, 0]
    assert ranks_for_budget([cheap, dear], 120) == [2, 1]


def test_parse_size():
    assert parse_size("50MB") == 50_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("1024") == 1024
    with pytest.raises(SdcError):
        parse_size("fifty")
