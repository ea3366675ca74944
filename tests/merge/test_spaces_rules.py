"""Core / KnOTS spaces and the 2025 rules against numpy references written here from the papers'
definitions (dense updates, numpy SVDs), never from lorakit's own code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import LorakitError
from lorakit.lowrank import RankPolicy

OUT, IN = 14, 11


def _adapters(seed=0, ranks=(2, 3, 4), alphas=(4.0, 3.0, 1.0), missing=False):
    g = torch.Generator().manual_seed(seed)
    ads = []
    for i, r in enumerate(ranks):
        mods = {}
        for key in ("q", "v"):
            if missing and key == "v" and i == 1:
                continue
            mods[key] = LoraModule(torch.randn(r, IN, generator=g, dtype=torch.float64),
                                   torch.randn(OUT, r, generator=g, dtype=torch.float64),
                                   alpha=alphas[i], rslora=i == 2)
        ads.append(Adapter(modules=mods))
    return ads


def _tau(ads, weights, key="q"):
    """Dense ``w_t s_t B_t A_t`` per task (zeros for a missing module), numpy."""
    out = []
    for a, w in zip(ads, weights, strict=True):
        m = a.modules.get(key)
        out.append(np.zeros((OUT, IN)) if m is None else
                   w * m.scale * (m.up.numpy() @ m.down.numpy()))
    return np.stack(out)


def _d(merged, key="q"):
    return merged.modules[key].delta(torch.float64).numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ spaces: exact projections


@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("method, opts", [
    ("magnitude_prune", {"density": 1.0}), ("dare_linear", {"density": 1.0}),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.0, "lam": 1.0}),
    ("della", {"density": 1.0, "epsilon": 0.0, "consensus": "none", "lam": 1.0})])
def test_linear_rule_in_space_equals_linear(space, method, opts):
    ads = _adapters(missing=True)
    w = [1.0, -0.5, 2.0]
    lin = lorakit.merge(ads, "linear", w)
    got = lorakit.merge(ads, method, w, space=space, **opts)
    for key in ("q", "v"):
        assert _rel(_d(got, key), _d(lin, key)) < 1e-6, key


def test_core_space_float32_inputs_stay_exact():
    ads = _adapters(1)
    for a in ads:
        for m in a.modules.values():
            m.down, m.up = m.down.float(), m.up.float()
    lin = lorakit.merge(ads, "linear")
    got = lorakit.merge(ads, "magnitude_prune", density=1.0, space="core")
    assert _rel(_d(got), _d(lin)) < 1e-5


def _np_core(tau, ads, key="q"):
    """Core Space (Panariello et al.): U_B = left singular vectors of [B_1 .. B_T], V_A = right
    singular vectors of [A_1; ..; A_T], M_t = U_B^T D_t V_A; D_t = U_B M_t V_A^T."""
    bs = np.concatenate([a.modules[key].up.numpy() for a in ads], axis=1)
    as_ = np.concatenate([a.modules[key].down.numpy() for a in ads], axis=0)
    ub, s, _ = np.linalg.svd(bs, full_matrices=False)
    ub = ub[:, s > 1e-10 * s[0]]
    _, s2, vh = np.linalg.svd(as_, full_matrices=False)
    va = vh[s2 > 1e-10 * s2[0]].T
    return ub, np.stack([ub.T @ t @ va for t in tau]), va


def _np_ties(tau, density):
    out = np.zeros_like(tau)
    for i, t in enumerate(tau):
        k = int(round(density * t.size))
        idx = np.argsort(-np.abs(t).ravel(), kind="stable")[:k]
        out[i].ravel()[idx] = t.ravel()[idx]
    elected = np.where(out.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(out) == elected) & (out != 0)
    return (out * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_in_core_space_matches_numpy(density):
    ads = _adapters(2)
    w = [1.0, 1.0, 0.5]
    tau = _tau(ads, w)
    ub, cores, va = _np_core(tau, ads)
    want = ub @ _np_ties(cores, density) @ va.T
    got = lorakit.merge(ads, "ties", w, density=density, space="core")
    assert _rel(_d(got), want) < 1e-8


def test_core_space_global_scope_and_rank_policy():
    ads = _adapters(3)
    full = lorakit.merge(ads, "ties", density=0.3, space="core", scope="global")
    cut = lorakit.merge(ads, "ties", density=0.3, space="core", scope="global",
                        policy=RankPolicy.fixed(2))
    d = _d(full)
    u, s, vh = np.linalg.svd(d)
    assert _rel(_d(cut), (u[:, :2] * s[:2]) @ vh[:2]) < 1e-8
    assert set(cut.ranks().values()) == {2}


# --------------------------------------------------------------- entry-wise rules: full space


def _np_breadcrumbs(tau, density, gamma):
    """Per task: drop the top gamma fraction by magnitude, keep the next density fraction."""
    out = np.zeros_like(tau)
    for i, t in enumerate(tau):
        order = np.argsort(-np.abs(t).ravel(), kind="stable")
        top = int(round(gamma * t.size))
        keep = order[top:top + int(round(density * t.size))]
        out[i].ravel()[keep] = t.ravel()[keep]
    return out.sum(0)


@pytest.mark.parametrize("space", ["full", "core"])
def test_breadcrumbs_matches_numpy(space):
    ads = _adapters(4)
    w = [1.0, 0.7, 1.3]
    tau = _tau(ads, w)
    if space == "full":
        got = lorakit.merge(ads, "breadcrumbs", w, density=0.3, gamma=0.05, lam=1.0,
                            policy=RankPolicy.fixed(IN), dtype=torch.float64)
        np.testing.assert_allclose(_d(got), _np_breadcrumbs(tau, 0.3, 0.05), rtol=1e-4,
                                   atol=1e-4)
    else:
        ub, cores, va = _np_core(tau, ads)
        got = lorakit.merge(ads, "breadcrumbs", w, density=0.3, gamma=0.05, space="core")
        assert _rel(_d(got), 0.3 * ub @ _np_breadcrumbs(cores, 0.3, 0.05) @ va.T) < 1e-8


def _np_della(tau, density, epsilon, draws):
    """MagPrune per row: rank j (0 = smallest) kept w.p. p_j = density - eps/2 + eps j/(n-1),
    rescaled by 1/p_j; then TIES elect (sign of the sum) and the disjoint mean."""
    n = tau.shape[-1]
    ranks = np.argsort(np.argsort(np.abs(tau), axis=-1, kind="stable"), axis=-1)
    p = density - epsilon / 2 + epsilon * ranks / (n - 1)
    kept = np.where(draws < p, tau / p, 0.0)
    elected = np.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(kept) == elected) & (kept != 0)
    return (kept * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_della_matches_numpy_with_same_seed():
    ads = _adapters(5)
    w = [1.0, 1.0, 1.0]
    tau = _tau(ads, w)
    got = lorakit.merge(ads, "della", w, density=0.5, epsilon=0.2, seed=7, lam=1.0,
                        policy=RankPolicy.fixed(IN), dtype=torch.float64)
    draws = torch.rand(tau.shape, generator=torch.Generator().manual_seed(7)).double().numpy()
    np.testing.assert_allclose(_d(got), _np_della(tau, 0.5, 0.2, draws), rtol=1e-4, atol=1e-4)
    again = lorakit.merge(ads, "della", w, density=0.5, epsilon=0.2, seed=7, lam=1.0,
                          policy=RankPolicy.fixed(IN), dtype=torch.float64)
    assert torch.equal(got.modules["q"].up, again.modules["q"].up)


# ----------------------------------------------------- subspace rules: dense numpy definitions


def _np_top(m, k=None):
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    r = int((s > 1e-6 * s[0]).sum()) if s[0] > 0 else 0
    r = r if k is None else min(r, k)
    return u[:, :r], s[:r], vh[:r]


def _np_orth(x):
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def _np_tsv(tau, frac, alpha):
    k = max(1, math.floor(frac * min(OUT, IN)))
    parts = [_np_top(t, k) for t in tau]
    u = np.concatenate([p[0] for p in parts], 1)
    s = np.concatenate([p[1] for p in parts])
    v = np.concatenate([p[2].T for p in parts], 1)
    return alpha * (_np_orth(u) * s) @ _np_orth(v).T


def _core_dim(tau):
    sb = np.linalg.svd(np.concatenate(list(tau), 1), compute_uv=False)
    sa = np.linalg.svd(np.concatenate(list(tau), 0), compute_uv=False)
    return min(int((sb > 1e-10 * sb[0]).sum()), int((sa > 1e-10 * sa[0]).sum()))


def _np_iso_c(tau, alpha):
    u, s, vh = _np_top(tau.sum(0))
    return alpha * s.mean() * (u @ vh)


def _np_iso_cts(tau, frac, alpha):
    d = _core_dim(tau)
    k = max(1, math.floor(frac * d))
    s_task = (d - k) // len(tau)
    u, s, vh = _np_top(tau.sum(0), k)
    us, ss, vs = [u], [s], [vh.T]
    for t in tau:
        if s_task == 0:
            break
        ut, st, vht = _np_top(t - u @ u.T @ t, s_task)
        us.append(ut)
        ss.append(st)
        vs.append(vht.T)
    return alpha * np.concatenate(ss).mean() * (_np_orth(np.concatenate(us, 1))
                                                 @ _np_orth(np.concatenate(vs, 1)).T)


def _np_cart(tau, frac, lam):
    mean = tau.mean(0)
    k = max(1, math.ceil(frac * _core_dim(tau)))
    out = mean.copy()
    for t in tau:
        u, s, vh = _np_top(t - mean, k)
        out += lam * (u * s) @ vh
    return out


@pytest.mark.parametrize("ranks", [(2, 3, 4), (5, 5, 5)])
@pytest.mark.parametrize("method, opts, ref", [
    ("tsv", {"sv_reduction": 0.1, "alpha": 1.0}, lambda t: _np_tsv(t, 0.1, 1.0)),
    ("tsv", {}, lambda t: _np_tsv(t, 1 / 3, 0.3)),
    ("iso_c", {"alpha": 1.3}, lambda t: _np_iso_c(t, 1.3)),
    ("iso_cts", {"common_fraction": 0.5, "alpha": 1.0}, lambda t: _np_iso_cts(t, 0.5, 1.0)),
    ("iso_cts", {}, lambda t: _np_iso_cts(t, 0.8, 1.5)),
    ("cart", {"rank_fraction": 0.2, "lam": 0.7}, lambda t: _np_cart(t, 0.2, 0.7)),
])
def test_subspace_rule_matches_dense_numpy(ranks, method, opts, ref):
    ads = _adapters(6, ranks=ranks)
    w = [1.0, 0.5, 1.5]
    tau = _tau(ads, w)
    got = lorakit.merge(ads, method, w, **opts)
    assert _rel(_d(got), ref(tau)) < 1e-6


def test_cart_full_rank_is_the_mean():
    ads = _adapters(7)
    mean = lorakit.merge(ads, "linear", [1 / 3] * 3)
    got = lorakit.merge(ads, "cart", rank_fraction=1.0)
    assert _rel(_d(got), _d(mean)) < 1e-6


@pytest.mark.parametrize("method, opts, key", [
    ("breadcrumbs", {"gamma": 0.95}, "gamma"), ("della", {"epsilon": 1.5}, "epsilon"),
    ("tsv", {"sv_reduction": 0}, "sv_reduction"), ("cart", {"rank_fraction": 2}, "rank_fraction"),
    ("iso_cts", {"common_fraction": -1}, "common_fraction"), ("ties", {"space": "nope"}, None),
])
def test_bad_options_are_named(method, opts, key):
    with pytest.raises((LorakitError, ValueError)) as e:
        lorakit.merge(_adapters(), method, **opts)
    if key:
        assert e.value.key == key
