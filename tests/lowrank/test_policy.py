"""Rank policies pick the minimal rank meeting their target (checked by brute force), and the
global budget allocation against brute force and uniform ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.errors import OptionError
from lorakit.lowrank import PolicyKind, RankPolicy, allocate_budget, select_rank

# descending spectra, some with exact zeros at the tail (rank-deficient updates)
spectra = st.tuples(st.lists(st.floats(1e-4, 1e3), min_size=1, max_size=24),
                    st.integers(0, 4)).map(
    lambda t: torch.tensor(sorted(t[0], reverse=True) + [0.0] * t[1], dtype=torch.float64))


def _meets(s: np.ndarray, k: int, kind: str, v: float) -> bool:
    """The target of each dynamic policy, written out directly."""
    e = s ** 2
    if kind == "energy":
        return e[:k].sum() >= v * e.sum() - 1e-12
    if kind == "sv_fro":
        return np.sqrt(e[:k].sum() / e.sum()) >= v - 1e-12
    if kind == "sv_cumulative":
        return s[:k].sum() / s.sum() >= v - 1e-12
    if kind == "sv_ratio":  # every value >= s_max / X is kept
        return all(s[i] < s[0] / v * (1 - 1e-12) for i in range(k, len(s)))
    if kind == "threshold":  # every value > T is kept
        return all(s[i] <= v for i in range(k, len(s)))
    raise AssertionError(kind)


def _brute(s: np.ndarray, kind: str, v: float) -> int:
    return next(j for j in range(0, len(s) + 1) if _meets(s, j, kind, v))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(s=spectra, kind=st.sampled_from(["energy", "sv_fro", "sv_cumulative"]),
       v=st.floats(0.05, 1.0))
def test_fractional_policies_are_minimal(s, kind, v):
    k = select_rank(s, RankPolicy.from_options(**{kind: v}))
    assert k == max(1, _brute(s.numpy(), kind, v))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(s=spectra, v=st.floats(1.0, 1e4))
def test_sv_ratio_is_minimal(s, v):
    k = select_rank(s, RankPolicy.from_options(sv_ratio=v))
    assert k == max(1, _brute(s.numpy(), "sv_ratio", v))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(s=spectra, v=st.floats(0.0, 1e3))
def test_threshold_is_minimal(s, v):
    k = select_rank(s, RankPolicy.from_options(threshold=v))
    assert k == max(1, _brute(s.numpy(), "threshold", v))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(s=spectra, v=st.floats(1.0, 1e4))
def test_kohya_sv_ratio_before_the_fix_keeps_one_more(s, v):
    """The documented difference: kohya's ``#{s > s_max / X} + 1`` (releases up to 41de936)."""
    arr = s.numpy()
    kohya_old = min(int((arr > arr[0] / v).sum()) + 1, len(arr))
    ours = select_rank(s, RankPolicy.from_options(sv_ratio=v))
    strict = int((arr > arr[0] / v).sum())  # later kohya releases
    if np.any(np.isclose(arr, arr[0] / v, rtol=1e-9)):
        return  # a tie: kohya keeps s > s_max / X, lorakit s >= s_max / X
    assert ours == max(1, strict)
    if strict < len(arr):
        assert kohya_old == ours + 1


def test_all_zero_spectrum_keeps_min_rank():
    s = torch.zeros(6, dtype=torch.float64)
    for opts in ({"energy": 0.9}, {"sv_ratio": 10}, {"sv_fro": 0.5}, {"sv_cumulative": 0.5},
                 {"threshold": 0.0}):
        assert select_rank(s, RankPolicy.from_options(**opts)) == 1


def test_fixed_is_capped_by_available_rank_and_caps_apply():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert select_rank(s, RankPolicy.fixed(8)) == 4
    assert select_rank(s, RankPolicy.fixed(1)) == 1
    assert select_rank(s, RankPolicy.from_options(energy=1.0, max_rank=2)) == 2
    assert select_rank(s, RankPolicy.from_options(threshold=10.0, min_rank=3)) == 3
    assert select_rank(s, RankPolicy.from_options(threshold=10.0, min_rank=9)) == 4


def test_budget_for_one_module_needs_its_cost():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert select_rank(s, RankPolicy.from_options(budget=250), cost_per_rank=100) == 2
    assert select_rank(s, RankPolicy.from_options(budget=0.5), cost_per_rank=100) == 2
    with pytest.raises(OptionError, match="cost_per_rank"):
        select_rank(s, RankPolicy.from_options(budget=250))


def test_conv_rank_override():
    p = RankPolicy.from_options(energy=0.5, conv_rank=3)
    assert p.for_conv().rank == 3 and p.for_conv().kind is PolicyKind.FIXED
    assert RankPolicy.from_options(energy=0.5).for_conv().kind is PolicyKind.ENERGY


def test_budget_values():
    assert RankPolicy.from_options(budget=0.25).budget_params(1000) == 250
    assert RankPolicy.from_options(budget=1.0).budget_params(1000) == 1000
    assert RankPolicy.from_options(budget=400).budget_params(1000) == 400
    assert RankPolicy.from_options(budget=2e6).budget_params(10) == 2_000_000
    assert RankPolicy.from_options(rank=16.0).value == 16


@pytest.mark.parametrize("kwargs,match", [
    ({}, "no rank policy"), ({"conv_rank": 4}, "--conv-rank needs a rank policy"),
    ({"rank": 2, "energy": 0.5}, "several rank policies given \\(rank, energy\\)"),
    ({"energy": 1.5}, "--energy must be in \\(0, 1\\], got 1.5"),
    ({"sv_fro": 0.0}, "--sv-fro must be in"), ({"rank": 0}, "--rank must be an integer >= 1"),
    ({"rank": 2.5}, "--rank must be an integer"), ({"sv_ratio": 0.5}, "--sv-ratio must be >= 1"),
    ({"threshold": -1.0}, "--threshold must be >= 0"),
    ({"budget": 1.5}, "--budget must be a parameter count"), ({"budget": 0}, "--budget must be"),
    ({"energy": float("nan")}, "--energy must be a finite number"),
    ({"rank": True}, "--rank must be a finite number"),
    ({"rank": 4, "conv_rank": 0}, "--conv-rank must be an integer >= 1"),
    ({"rank": 4, "max_rank": 0}, "--max-rank must be"),
])
def test_bad_policy_options(kwargs, match):
    with pytest.raises(OptionError, match=match):
        RankPolicy.from_options(**kwargs)


def _kept(spectra, ranks):
    return sum(float((spectra[k][:r] ** 2).sum()) for k, r in ranks.items())


def _brute_budget(spectra, costs, budget):
    """The best kept energy over every allocation with ranks >= 1 within the budget."""
    keys = list(spectra)
    best = -1.0
    for ranks in itertools.product(*[range(1, len(spectra[k]) + 1) for k in keys]):
        if sum(r * costs[k] for r, k in zip(ranks, keys, strict=True)) <= budget:
            best = max(best, _kept(spectra, dict(zip(keys, ranks, strict=True))))
    return best


def _random_spectra(seed, n=3, r=4):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.sort(torch.rand(r, generator=g, dtype=torch.float64) * (i + 1),
                          descending=True).values for i, k in enumerate("abcdef"[:n])}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [30, 70, 110])
def test_budget_is_optimal_with_equal_costs(seed, budget):
    spectra = _random_spectra(seed)
    costs = dict.fromkeys(spectra, 10)
    ranks = allocate_budget(spectra, costs, budget)
    assert sum(r * costs[k] for k, r in ranks.items()) <= budget
    assert _kept(spectra, ranks) == pytest.approx(_brute_budget(spectra, costs, budget), rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_budget_with_unequal_costs_against_brute_force(seed):
    """Never over budget, and at least the optimum of ``budget - max cost`` (the documented
    bound); exactly optimal at the spend of the greedy's breakpoints."""
    spectra = _random_spectra(seed, n=3, r=4)
    costs = {"a": 7, "b": 11, "c": 16}
    for budget in range(34, 140, 9):
        ranks = allocate_budget(spectra, costs, budget)
        spent = sum(r * costs[k] for k, r in ranks.items())
        assert spent <= budget
        assert _kept(spectra, ranks) >= _brute_budget(spectra, costs, budget - 16) - 1e-12
        assert _kept(spectra, ranks) <= _brute_budget(spectra, costs, budget) + 1e-12
    # a breakpoint: the budget is exactly what the greedy order spends -> optimal for it
    units = sorted(((float(s[i] ** 2) / costs[k], k) for k, s in spectra.items()
                    for i in range(1, 4)), reverse=True)
    spend = sum(costs.values()) + sum(costs[k] for _, k in units[:4])
    ranks = allocate_budget(spectra, costs, spend)
    assert _kept(spectra, ranks) == pytest.approx(_brute_budget(spectra, costs, spend), rel=1e-12)


def test_budget_skips_zero_gain_units_and_keeps_min_rank():
    spectra = {"a": torch.tensor([2.0, 0.0, 0.0]), "z": torch.zeros(3)}
    ranks = allocate_budget(spectra, {"a": 10, "z": 10}, 1000)
    assert ranks == {"a": 1, "z": 1}
    assert allocate_budget(spectra, {"a": 10, "z": 10}, 5) == {"a": 1, "z": 1}  # min_rank wins


@pytest.mark.parametrize("seed", range(3))
def test_budget_beats_uniform_at_equal_parameter_count(seed):
    """Synthetic modules of different shapes and spectra: the allocation spends no more than
    uniform rank 4 and leaves less total squared error."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"m{i}": (o, n) for i, (o, n) in enumerate([(64, 64), (64, 172), (172, 64)] * 2)}
    spectra = {k: torch.sort(torch.rand(16, generator=g, dtype=torch.float64) ** (1 + 3 * i),
                             descending=True).values * (i + 1) for i, k in enumerate(shapes)}
    costs = {k: o + n for k, (o, n) in shapes.items()}
    uniform = 4
    budget = uniform * sum(costs.values())
    ranks = allocate_budget(spectra, costs, budget)
    assert sum(r * costs[k] for k, r in ranks.items()) <= budget
    err_budget = sum(float((spectra[k][r:] ** 2).sum()) for k, r in ranks.items())
    err_uniform = sum(float((s[uniform:] ** 2).sum()) for s in spectra.values())
    total = sum(float((s ** 2).sum()) for s in spectra.values())
    print(f"seed {seed}: relative error uniform {np.sqrt(err_uniform / total):.4f}, "
          f"budget {np.sqrt(err_budget / total):.4f}")
    assert err_budget < err_uniform
