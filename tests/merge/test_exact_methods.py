"""Exactness of cat / linear / task_arithmetic / svd against an independent dense numpy sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import IncompatibleAdaptersError, OptionError, UnsupportedVariantError
from lorakit.lowrank import RankPolicy


def _module(g, out, inp, r, alpha, rslora=False, conv=False):
    if conv:
        return LoraModule(down=torch.randn(r, inp, 3, 3, generator=g),
                          up=torch.randn(out, r, 1, 1, generator=g), alpha=alpha, rslora=rslora,
                          kind=lorakit.ModuleKind.CONV)
    return LoraModule(down=torch.randn(r, inp, generator=g), up=torch.randn(out, r, generator=g),
                      alpha=alpha, rslora=rslora)


def _adapters(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = Adapter(modules={"l.q": _module(g, 24, 16, 4, 8.0), "l.v": _module(g, 12, 16, 2, 3.0),
                         "l.c": _module(g, 8, 5, 3, 6.0, conv=True)})
    b = Adapter(modules={"l.q": _module(g, 24, 16, 8, 4.0, rslora=True),
                         "l.v": _module(g, 12, 16, 6, 1.5),
                         "l.c": _module(g, 8, 5, 2, 2.0, rslora=True, conv=True)})
    c = Adapter(modules={"l.q": _module(g, 24, 16, 1, 1.0), "l.k": _module(g, 24, 16, 5, 10.0)})
    return [a, b, c]


def dense(m: LoraModule) -> np.ndarray:
    """scale * B @ A in float64 numpy, computed without lorakit's delta()."""
    r = m.down.shape[0]
    scale = m.alpha / (np.sqrt(r) if m.rslora else r)
    b = m.up.double().numpy().reshape(m.up.shape[0], r)
    a = m.down.double().numpy().reshape(r, -1)
    return scale * b @ a


def expected_sum(adapters, weights):
    keys = []
    for ad in adapters:
        keys += [k for k in ad.modules if k not in keys]
    out = {}
    for k in keys:
        out[k] = sum(w * dense(ad.modules[k]) for ad, w in zip(adapters, weights, strict=True)
                     if k in ad.modules)
    return out


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("method", ["cat", "linear", "task_arithmetic"])
def test_exact_methods_equal_weighted_sum(method):
    ads = _adapters()
    weights = [1.0, -0.5, 2.0]
    merged = lorakit.merge(ads, method, weights)
    want = expected_sum(ads, weights)
    assert set(merged.modules) == set(want)
    for k, m in merged.modules.items():
        assert rel(dense(m), want[k]) < 1e-6, k


def test_cat_rank_is_sum_of_ranks():
    ads = _adapters()
    merged = lorakit.merge(ads, "cat")
    assert merged.modules["l.q"].rank == 4 + 8 + 1
    assert merged.modules["l.k"].rank == 5


@pytest.mark.parametrize("k", [1, 3, 6])
def test_svd_truncation_is_eckart_young_optimal(k):
    ads = _adapters(1)
    weights = [1.0, 0.7, -1.3]
    merged = lorakit.merge(ads, "svd", weights, policy=RankPolicy.from_options(rank=k))
    want = expected_sum(ads, weights)
    for key, m in merged.modules.items():
        d = want[key]
        s = np.linalg.svd(d.reshape(d.shape[0], -1), compute_uv=False)
        kk = min(k, len(s))
        optimum = np.sqrt((s[kk:] ** 2).sum())
        err = np.linalg.norm(dense(m).reshape(d.shape[0], -1) - d.reshape(d.shape[0], -1))
        assert m.rank <= kk
        # float32 output factors add ~1e-7 relative rounding on top of the optimum
        assert err <= optimum * (1 + 1e-6) + 1e-6 * np.linalg.norm(d), key


def test_svd_default_rank_is_largest_input_rank():
    ads = _adapters(2)
    merged = lorakit.merge(ads, "svd")
    assert merged.modules["l.q"].rank == 8


def test_factor_linear_has_cross_terms():
    g = torch.Generator().manual_seed(3)
    a = Adapter(modules={"q": _module(g, 10, 10, 2, 2.0)})
    b = Adapter(modules={"q": _module(g, 10, 10, 2, 2.0)})
    merged = lorakit.merge([a, b], "factor_linear")
    want = expected_sum([a, b], [1, 1])["q"]
    ma, mb = a.modules["q"], b.modules["q"]
    cross = ma.scale * (mb.up.double().numpy() @ ma.down.double().numpy()
                        + ma.up.double().numpy() @ mb.down.double().numpy())
    got = dense(merged.modules["q"])
    assert rel(got, want) > 1e-3  # inexact ...
    assert rel(got, want + cross) < 1e-6  # ... by exactly the cross terms (float32 output)


def test_union_and_intersect():
    ads = _adapters()
    assert "l.k" in lorakit.merge(ads, "cat").modules
    inter = lorakit.merge(ads, "cat", intersect=True)
    assert set(inter.modules) == {"l.q"}


def test_errors_are_named():
    ads = _adapters()
    with pytest.raises(OptionError, match="unknown merge method"):
        lorakit.merge(ads, "nope")
    with pytest.raises(OptionError, match="3 weights"):
        lorakit.merge(ads[:2], "cat", [1, 1, 1])
    g = torch.Generator().manual_seed(0)
    bad = Adapter(modules={"l.q": _module(g, 25, 16, 2, 1.0)}, source="bad.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match="bad.safetensors.*l.q"):
        lorakit.merge([ads[0], bad], "cat")
    dora = Adapter(modules={"l.q": LoraModule(torch.ones(1, 16), torch.ones(24, 1), alpha=1,
                                              magnitude=torch.ones(24))}, source="dora_dir")
    with pytest.raises(UnsupportedVariantError, match="dora_dir.*DoRA"):
        lorakit.merge([ads[0], dora], "svd")
    heads = Adapter(modules=dict(ads[0].modules), extras={"classifier.weight": torch.ones(2)})
    with pytest.raises(IncompatibleAdaptersError, match="extra tensors"):
        lorakit.merge([ads[0], heads], "cat")
    assert "classifier.weight" not in lorakit.merge([heads, ads[0]], "cat", extras="drop").extras
