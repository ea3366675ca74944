"""LoRA-LEGO invariances and identities; KnOTS identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule


def _ad(seed, r, alpha, out=16, inp=12):
    g = torch.Generator().manual_seed(seed)
    return Adapter(modules={"q": LoraModule(torch.randn(r, inp, generator=g),
                                            torch.randn(out, r, generator=g), alpha)})


def _d(a):
    return a.modules["q"].delta(torch.float64)


def _rel(x, y):
    return float((x - y).norm() / y.norm())


def test_lego_with_k_equal_to_all_units_equals_cat():
    ads = [_ad(0, 4, 8.0), _ad(1, 2, 3.0), _ad(2, 3, 1.0)]
    cat = lorakit.merge(ads, "cat", [1, 0.5, -1])
    lego = lorakit.merge(ads, "lego", [1, 0.5, -1], k=9, param_reweight=False)
    assert _rel(_d(lego), _d(cat)) < 1e-6


def test_lego_self_merge_reproduces_adapter():
    a = _ad(3, 4, 8.0)
    lego = lorakit.merge([a, a], "lego", k=4, param_reweight=False)
    assert _rel(_d(lego), _d(a)) < 1e-6


def _flip_and_rescale(a: Adapter, j: int, t: float) -> Adapter:
    m = a.modules["q"]
    down, up = m.down.clone(), m.up.clone()
    down[j] *= -t
    up[:, j] /= -t
    return Adapter(modules={"q": m.with_factors(down, up)})


@pytest.mark.parametrize("reweight", [False, True])
def test_lego_invariant_to_unit_sign_and_scale(reweight):
    ads = [_ad(4, 4, 8.0), _ad(5, 4, 2.0)]
    base = lorakit.merge(ads, "lego", k=3, param_reweight=reweight, seed=1)
    moved = [_flip_and_rescale(ads[0], 1, 3.5), _flip_and_rescale(ads[1], 2, 0.2)]
    other = lorakit.merge(moved, "lego", k=3, param_reweight=reweight, seed=1)
    assert _rel(_d(other), _d(base)) < 1e-5


def test_lego_same_seed_same_bytes():
    ads = [_ad(6, 4, 8.0), _ad(7, 6, 2.0)]
    x = lorakit.merge(ads, "lego", k=3, seed=9)
    y = lorakit.merge(ads, "lego", k=3, seed=9)
    assert torch.equal(x.modules["q"].up, y.modules["q"].up)
    assert torch.equal(x.modules["q"].down, y.modules["q"].down)
    assert x.modules["q"].rank == 3


def test_lego_param_reweight_restores_mean_member_norm():
    ads = [_ad(8, 4, 4.0), _ad(9, 4, 4.0)]
    merged = lorakit.merge(ads, "lego", k=1, param_reweight=True)
    m = merged.modules["q"]
    units = [ads[i].modules["q"] for i in range(2)]
    norms = [float(u.up[:, j].norm() * u.down[j].norm() * u.scale) for u in units
             for j in range(4)]
    assert float(m.up.norm() * m.down.norm()) == pytest.approx(np.mean(norms), rel=1e-5)


def test_knots_sum_equals_linear_and_ties_runs():
    ads = [_ad(10, 4, 8.0), _ad(11, 2, 3.0), _ad(12, 3, 1.0)]
    lin = lorakit.merge(ads, "linear", [1, -0.5, 2])
    kn = lorakit.merge(ads, "knots", [1, -0.5, 2], merge="sum", density=1.0, lam=1.0)
    assert _rel(_d(kn), _d(lin)) < 1e-6
    ties = lorakit.merge(ads, "knots", density=0.3)
    assert ties.modules["q"].rank <= 9
