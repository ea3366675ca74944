"""Rank policies pick the minimal rank meeting their target (checked by brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.errors import OptionError
from lorakit.lowrank import RankPolicy, allocate_budget, select_rank

spectra = st.lists(st.floats(1e-4, 1e3), min_size=1, max_size=24).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))


def _meets(s: np.ndarray, k: int, kind: str, v: float) -> bool:
    e = s ** 2
    if kind == "energy":
        return e[:k].sum() >= v * e.sum() - 1e-12
    if kind == "sv_fro":
        return np.sqrt(e[:k].sum() / e.sum()) >= v - 1e-12
    if kind == "sv_cumulative":
        return s[:k].sum() / s.sum() >= v - 1e-12
    if kind == "sv_ratio":
        return all(s[i] < s[0] / v * (1 - 1e-12) for i in range(k, len(s)))
    if kind == "threshold":
        return all(s[i] <= v for i in range(k, len(s)))
    raise AssertionError(kind)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(s=spectra, kind=st.sampled_from(["energy", "sv_fro", "sv_cumulative"]),
       v=st.floats(0.05, 1.0))
def test_fractional_policies_are_minimal(s, kind, v):
    k = select_rank(s, RankPolicy.from_options(**{kind: v}))
    arr = s.numpy()
    brute = next(j for j in range(1, len(arr) + 1) if _meets(arr, j, kind, v))
    assert k == brute


@settings(max_examples=100, deadline=None, derandomize=True)
@given(s=spectra, v=st.floats(1.0, 1e4))
def test_sv_ratio_is_minimal(s, v):
    k = select_rank(s, RankPolicy.from_options(sv_ratio=v))
    arr = s.numpy()
    brute = next(j for j in range(1, len(arr) + 1) if _meets(arr, j, "sv_ratio", v))
    assert k == brute


@settings(max_examples=100, deadline=None, derandomize=True)
@given(s=spectra, v=st.floats(0.0, 1e3))
def test_threshold_is_minimal(s, v):
    k = select_rank(s, RankPolicy.from_options(threshold=v))
    arr = s.numpy()
    brute = next(j for j in range(0, len(arr) + 1) if _meets(arr, j, "threshold", v))
    assert k == max(1, brute)


def test_fixed_is_capped_by_available_rank():
    s = torch.tensor([3.0, 2.0])
    assert select_rank(s, RankPolicy.fixed(8)) == 2
    assert select_rank(s, RankPolicy.fixed(1)) == 1


def test_conv_rank_override():
    p = RankPolicy.from_options(energy=0.5, conv_rank=3)
    assert p.for_conv().rank == 3


@pytest.mark.parametrize("kwargs,match", [
    ({}, "no rank policy"), ({"rank": 2, "energy": 0.5}, "several rank policies"),
    ({"energy": 1.5}, "--energy must be in"), ({"rank": 0}, "--rank must be"),
    ({"sv_ratio": 0.5}, "--sv-ratio must be"),
])
def test_bad_policy_options(kwargs, match):
    with pytest.raises(OptionError, match=match):
        RankPolicy.from_options(**kwargs)


def _brute_budget(spectra, costs, budget):
    keys = list(spectra)
    best, best_ranks = -1.0, None
    for ranks in itertools.product(*[range(1, len(spectra[k]) + 1) for k in keys]):
        cost = sum(r * costs[k] for r, k in zip(ranks, keys, strict=True))
        if cost > budget:
            continue
        kept = sum(float((spectra[k][:r] ** 2).sum()) for r, k in zip(ranks, keys, strict=True))
        if kept > best:
            best, best_ranks = kept, dict(zip(keys, ranks, strict=True))
    return best, best_ranks


@pytest.mark.parametrize("seed", range(6))
def test_budget_is_optimal_on_tiny_cases_with_equal_costs(seed):
    g = torch.Generator().manual_seed(seed)
    spectra = {k: torch.sort(torch.rand(4, generator=g) * (i + 1), descending=True).values
               for i, k in enumerate("abc")}
    costs = {"a": 10, "b": 10, "c": 10}
    ranks = allocate_budget(spectra, costs, 70)
    best, _ = _brute_budget(spectra, costs, 70)
    kept = sum(float((spectra[k][:r] ** 2).sum()) for k, r in ranks.items())
    assert kept == pytest.approx(best, rel=1e-12)
    assert sum(r * costs[k] for k, r in ranks.items()) <= 70


def test_budget_beats_uniform_at_equal_parameter_count():
    g = torch.Generator().manual_seed(0)
    spectra = {f"m{i}": torch.sort(torch.rand(16, generator=g) ** (1 + 3 * i),
                                   descending=True).values for i in range(6)}
    costs = {k: 100 for k in spectra}
    uniform = 4
    budget = uniform * 100 * len(spectra)
    ranks = allocate_budget(spectra, costs, budget)
    assert sum(r * 100 for r in ranks.values()) <= budget
    err_budget = sum(float((spectra[k][r:] ** 2).sum()) for k, r in ranks.items())
    err_uniform = sum(float((s[uniform:] ** 2).sum()) for s in spectra.values())
    assert err_budget < err_uniform
