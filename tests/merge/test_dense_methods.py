"""TIES / DARE / magnitude pruning against references written here from the papers' definitions
(dense numpy, same seed), before the low-rank step and exactly at full rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.lowrank import RankPolicy
from lorakit.merge.align import align
from lorakit.merge.dense import dense_updates
from lorakit.merge.options import DisjointMerge, SignMethod
from lorakit.merge.sparsify import dare_drop, disjoint_merge, elect_sign, trim_magnitude

OUT, IN = 12, 10


def _adapters(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    ads = []
    for i in range(n):
        r = (2, 3, 4)[i % 3]
        m = LoraModule(torch.randn(r, IN, generator=g, dtype=torch.float64),
                       torch.randn(OUT, r, generator=g, dtype=torch.float64), alpha=2.0 + i)
        ads.append(Adapter(modules={"q": m}))
    return ads


def _np_tau(ads, weights):
    return np.stack([w * (a.modules["q"].scale * a.modules["q"].up.numpy()
                          @ a.modules["q"].down.numpy()) for a, w in zip(ads, weights, strict=True)])


def ref_trim(tau, density):
    out = np.zeros_like(tau)
    for i, t in enumerate(tau):
        k = int(round(density * t.size))
        idx = np.argsort(-np.abs(t).ravel(), kind="stable")[:k]
        out[i].ravel()[idx] = t.ravel()[idx]
    return out


def ref_ties(tau, density, sign="total", disjoint="mean"):
    t = ref_trim(tau, density)
    elected = np.where((t.sum(0) if sign == "total" else np.sign(t).sum(0)) >= 0, 1.0, -1.0)
    agree = (np.sign(t) == elected) & (t != 0)
    total = (t * agree).sum(0)
    return total if disjoint == "sum" else total / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_ties_core_matches_reference(density, sign, disjoint):
    ads = _adapters()
    w = [1.0, 0.5, -0.8]
    tau_np = _np_tau(ads, w)
    tau = torch.from_numpy(tau_np)
    got = disjoint_merge(trim := trim_magnitude(tau, density), elect_sign(trim, SignMethod(sign)),
                         DisjointMerge(disjoint))
    np.testing.assert_allclose(got.numpy(), ref_ties(tau_np, density, sign, disjoint),
                               rtol=1e-12, atol=1e-12)


def test_dense_updates_match_reference():
    ads = _adapters()
    aligned = align(ads, [1.0, 0.5, -0.8])
    tau = dense_updates(aligned["q"], 3, torch.device("cpu"))
    np.testing.assert_allclose(tau.numpy(), _np_tau(ads, [1.0, 0.5, -0.8]), rtol=1e-5, atol=1e-5)


def test_dare_matches_reference_with_same_seed():
    tau = torch.randn(3, OUT, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = dare_drop(tau, 0.4, torch.Generator().manual_seed(5))
    keep = torch.rand(tau.shape, generator=torch.Generator().manual_seed(5)) < 0.4
    np.testing.assert_allclose(got.numpy(), (tau.numpy() * keep.numpy()) / 0.4, rtol=1e-12)
    again = dare_drop(tau, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(got, again)


def _full_rank_delta(merged):
    return merged.modules["q"].delta(torch.float64).numpy()


@pytest.mark.parametrize("density", [0.2, 0.6])
def test_ties_exact_at_full_rank(density):
    ads = _adapters(2)
    w = [1.0, 1.0, 1.0]
    merged = lorakit.merge(ads, "ties", w, density=density,
                           policy=RankPolicy.fixed(min(OUT, IN)))
    want = ref_ties(_np_tau(ads, w), density)
    np.testing.assert_allclose(_full_rank_delta(merged), want, rtol=1e-4, atol=1e-4)


def test_magnitude_prune_exact_at_full_rank():
    ads = _adapters(3)
    w = [1.0, 0.5, 2.0]
    merged = lorakit.merge(ads, "magnitude_prune", w, density=0.5,
                           policy=RankPolicy.fixed(IN))
    want = ref_trim(_np_tau(ads, w), 0.5).sum(0)
    np.testing.assert_allclose(_full_rank_delta(merged), want, rtol=1e-4, atol=1e-4)


def test_dare_linear_exact_at_full_rank_and_seeded():
    ads = _adapters(4)
    merged = lorakit.merge(ads, "dare_linear", density=0.5, seed=3, policy=RankPolicy.fixed(IN))
    again = lorakit.merge(ads, "dare_linear", density=0.5, seed=3, policy=RankPolicy.fixed(IN))
    assert torch.equal(merged.modules["q"].up, again.modules["q"].up)
    tau = _np_tau(ads, [1, 1, 1])
    keep = torch.rand(tau.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    want = (tau * keep.numpy() / 0.5).sum(0)
    np.testing.assert_allclose(_full_rank_delta(merged), want, rtol=1e-4, atol=1e-4)


def test_ties_low_rank_output_is_truncation_of_dense_result():
    ads = _adapters(5)
    merged = lorakit.merge(ads, "ties", density=0.3, policy=RankPolicy.fixed(3))
    want = ref_ties(_np_tau(ads, [1, 1, 1]), 0.3)
    s = np.linalg.svd(want, compute_uv=False)
    err = np.linalg.norm(_full_rank_delta(merged) - want)
    assert err <= np.sqrt((s[3:] ** 2).sum()) * 1.01 + 1e-5


@pytest.mark.parametrize("n,k", [(300_000, 1), (300_000, 60_000), (1_000_003, 999_999),
                                 (500_000, 500_000)])
def test_kth_largest_is_exact(n, k):
    from lorakit.merge.sparsify import kth_largest

    mag = torch.rand(n, generator=torch.Generator().manual_seed(n))
    want = torch.sort(mag, descending=True).values[k - 1]
    assert float(kth_largest(mag, k)) == float(want)
