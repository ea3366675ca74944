"""Rank-one unit identities (split, select, drop, reorder, combine, assemble) against independent
dense computations of ``scale * B @ A`` (numpy, float64), on synthetic and real adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.compose import (
    UnitOrder,
    assemble,
    combine,
    count,
    drop,
    reorder,
    select,
    split,
    unit_module,
)
from lorakit.errors import IncompatibleAdaptersError, OptionError, UnsupportedVariantError
from lorakit.lowrank import RankPolicy
from tests.conftest import real_adapter

TOL = 1e-6


def _module(g, out, inp, r, alpha, rslora=False, conv=False, dtype=torch.float32):
    if conv:
        return LoraModule(down=torch.randn(r, inp, 3, 3, generator=g, dtype=dtype),
                          up=torch.randn(out, r, 1, 1, generator=g, dtype=dtype), alpha=alpha,
                          rslora=rslora, kind=ModuleKind.CONV)
    return LoraModule(down=torch.randn(r, inp, generator=g, dtype=dtype),
                      up=torch.randn(out, r, generator=g, dtype=dtype), alpha=alpha,
                      rslora=rslora)


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = Adapter(modules={"l.0.attn.q": _module(g, 24, 16, 4, 8.0),
                         "l.0.mlp.up": _module(g, 12, 16, 3, 3.0, rslora=True),
                         "l.0.conv": _module(g, 8, 5, 3, 6.0, conv=True)},
                extras={"head.weight": torch.randn(3, 4, generator=g)}, base_model="m",
                source_format="peft")
    b = Adapter(modules={"l.0.attn.q": _module(g, 24, 16, 6, 4.0, rslora=True),
                         "l.0.attn.v": _module(g, 24, 16, 2, 1.5),
                         "l.0.conv": _module(g, 8, 5, 2, 2.0, conv=True)})
    return a, b


def dense(m: LoraModule) -> np.ndarray:
    """``scale * B @ A`` in float64 numpy, computed without lorakit."""
    r = m.down.shape[0]
    scale = m.alpha / (np.sqrt(r) if m.rslora else r)
    return scale * m.up.double().numpy().reshape(m.up.shape[0], r) @ \
        m.down.double().numpy().reshape(r, -1)


def dense_cols(m: LoraModule, idx) -> np.ndarray:
    """``scale * B[:, idx] @ A[idx]`` (the original module's scale), float64 numpy."""
    r = m.down.shape[0]
    scale = m.alpha / (np.sqrt(r) if m.rslora else r)
    b = m.up.double().numpy().reshape(m.up.shape[0], r)[:, idx]
    a = m.down.double().numpy().reshape(r, -1)[idx]
    return scale * b @ a


def rel(x, y):
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def test_split_then_assemble_reproduces_the_adapter():
    a, _ = _pair()
    units = split(a)
    assert count(units) == a.ranks()
    out = assemble(units, like=a)
    assert list(out.modules) == list(a.modules)
    for key, m in a.modules.items():
        got = out.modules[key]
        assert got.kind is m.kind and got.down.shape == m.down.shape and got.dtype == m.dtype
        assert got.scale == 1.0  # alpha = rank: the coefficients live in the factors
        assert rel(dense(got), dense(m)) < TOL, key
    assert out.extras.keys() == a.extras.keys() and out.base_model == "m"


@pytest.mark.parametrize("weight", [1.0, -0.7, 2.5])
def test_split_with_weight_scales_the_update(weight):
    a, _ = _pair(1)
    out = assemble(split(a, weight=weight), like=a)
    for key, m in a.modules.items():
        assert rel(dense(out.modules[key]), weight * dense(m)) < TOL


def test_unit_norms_are_the_rank_one_update_norms():
    a, _ = _pair(2)
    for key, us in split(a).items():
        m = a.modules[key]
        for u in us:
            want = np.linalg.norm(dense_cols(m, [u.index]))
            assert abs(u.norm - want) <= TOL * want
            assert rel(u.delta().numpy(), dense_cols(m, [u.index])) < TOL


def test_concatenating_units_of_two_adapters_equals_cat():
    a, b = _pair(3)
    wa, wb = 1.0, -0.5
    units = combine(split(a, wa, source=0), split(b, wb, source=1))
    composed = assemble(units, like=a)
    cat = lorakit.merge([a, b], "cat", [wa, wb], extras="first")
    assert list(composed.modules) == list(cat.modules)
    for key in cat.modules:
        want = sum(w * dense(x.modules[key]) for x, w in ((a, wa), (b, wb)) if key in x.modules)
        assert rel(dense(composed.modules[key]), want) < TOL, key
        # the same factors as cat, bit for bit (same folding, same order)
        assert torch.equal(composed.modules[key].down, cat.modules[key].down)
        assert torch.equal(composed.modules[key].up, cat.modules[key].up)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropping_units_equals_the_truncation(k):
    a, _ = _pair(4)
    units = drop(split(a), where=lambda u: u.index >= k)
    out = assemble(units, like=a)
    for key, m in a.modules.items():
        kk = min(k, m.rank)
        assert out.modules[key].rank == kk
        assert rel(dense(out.modules[key]), dense_cols(m, list(range(kk)))) < TOL


def test_dropping_named_units_removes_exactly_those():
    a, _ = _pair(5)
    gone = [("l.0.attn.q", 0, 1), ("l.0.attn.q", 0, 3), ("l.0.conv", 0, 0)]
    out = assemble(drop(split(a), gone), like=a)
    m = a.modules["l.0.attn.q"]
    assert rel(dense(out.modules["l.0.attn.q"]), dense_cols(m, [0, 2])) < TOL
    assert rel(dense(out.modules["l.0.conv"]), dense_cols(a.modules["l.0.conv"], [1, 2])) < TOL
    # dropping every unit of a module removes the module (a zero update)
    units = drop(split(a), [u for u in split(a)["l.0.mlp.up"]])
    assert "l.0.mlp.up" not in assemble(units, like=a).modules


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_units_of_a_resized_adapter_equal_resize_to_that_rank(k):
    # after a resize each unit is one singular triplet, so the k strongest units are the
    # Eckart-Young optimum of rank k: the same update as resizing straight to rank k
    g = torch.Generator().manual_seed(6)
    a = Adapter(modules={"q": _module(g, 30, 20, 8, 16.0, dtype=torch.float64),
                         "v": _module(g, 20, 20, 6, 3.0, rslora=True, dtype=torch.float64)})
    full, _ = lorakit.resize(a, RankPolicy.fixed(8))
    small, _ = lorakit.resize(a, RankPolicy.fixed(k))
    kept = assemble(select(split(full), top=k), like=full)
    for key in a.modules:
        assert kept.modules[key].rank == small.modules[key].rank
        assert rel(dense(kept.modules[key]), dense(small.modules[key])) < TOL


def test_select_criteria():
    # module "q": unit norms 3, 2, 1 (indices 0, 1, 2) with scale 1
    a = Adapter(modules={
        "blk.attn.q": LoraModule(torch.diag(torch.tensor([3.0, 2.0, 1.0])), torch.eye(3), 3.0),
        "blk.mlp.fc": LoraModule(torch.diag(torch.tensor([1.0, 4.0])), torch.eye(2), 2.0)})
    u = split(a)
    idx = lambda us: {k: [x.index for x in v] for k, v in us.items()}  # noqa: E731
    assert idx(select(u, top=1)) == {"blk.attn.q": [0], "blk.mlp.fc": [1]}
    assert idx(select(u, min_norm=2.0)) == {"blk.attn.q": [0, 1], "blk.mlp.fc": [1]}
    # shares: q 9/14, 4/14, 1/14; fc 1/17, 16/17
    assert idx(select(u, min_share=0.25)) == {"blk.attn.q": [0, 1], "blk.mlp.fc": [1]}
    assert idx(select(u, energy=0.9)) == {"blk.attn.q": [0, 1], "blk.mlp.fc": [1]}
    assert idx(select(u, energy=1.0)) == {"blk.attn.q": [0, 1, 2], "blk.mlp.fc": [1, 0]}
    assert idx(select(u, module_regex=r"\.attn\.")) == {"blk.attn.q": [0, 1, 2]}
    both = combine(u, split(a, source=7))
    assert {x.source for x in select(both, sources=[7])["blk.attn.q"]} == {7}
    assert select(u, min_norm=10.0) == {}


def test_reorder_changes_rank_order_not_the_update():
    a, b = _pair(7)
    units = combine(split(a, source=0), split(b, source=1))
    by_norm = reorder(units)
    for us in by_norm.values():
        norms = [x.norm for x in us]
        assert norms == sorted(norms, reverse=True)
    back = reorder(by_norm, UnitOrder.ORIGIN)
    assert {k: [x.name for x in v] for k, v in back.items()} == \
        {k: [x.name for x in v] for k, v in units.items()}
    x, y = assemble(by_norm, like=a), assemble(units, like=a)
    for key in y.modules:
        assert rel(dense(x.modules[key]), dense(y.modules[key])) < TOL
    assert [u.index for u in reorder(units, lambda u: -u.index)["l.0.attn.q"]][:2] == [5, 4]


def test_selection_does_not_modify_its_input():
    a, _ = _pair(8)
    units = split(a)
    before = {k: [u.name for u in v] for k, v in units.items()}
    select(units, top=1)
    drop(units, where=lambda u: True)
    reorder(units)
    assert {k: [u.name for u in v] for k, v in units.items()} == before


def test_strongest_of_a_plus_attention_units_of_b_real_gpt2():
    """The README example on two real GPT-2 adapters (same base, c_attn and c_proj)."""
    a = lorakit.load(real_adapter("gpt2_tigrinya"))  # rank 8
    b = lorakit.load(real_adapter("gpt2_r4_jhess"))  # rank 4
    units = combine(select(split(a, source=0), top=4),
                    select(split(b, source=1), module_regex=r"\.attn\.c_attn$"))
    composed = assemble(units, like=a)
    assert set(composed.modules) == set(a.modules) | {k for k in b.modules
                                                      if k.endswith("attn.c_attn")}
    for key, m in composed.modules.items():
        want = 0.0
        if key in a.modules:  # the 4 strongest units, ranked by an independent dense norm
            am = a.modules[key]
            norms = [np.linalg.norm(dense_cols(am, [j])) for j in range(am.rank)]
            want = want + dense_cols(am, list(np.argsort(norms)[::-1][:4]))
        if key.endswith("attn.c_attn") and key in b.modules:
            want = want + dense(b.modules[key])
        assert rel(dense(m), want) < TOL, key
    ranks = composed.ranks()
    assert all(r == 4 + (4 if k.endswith("attn.c_attn") else 0) for k, r in ranks.items())


def test_assembled_real_adapter_round_trips_through_peft(tmp_path):
    a = lorakit.load(real_adapter("distilbert_emotion_dayanidhi"))
    out = assemble(drop(split(a), where=lambda u: u.index % 2 == 1), like=a)
    lorakit.save(out, tmp_path / "half")
    back = lorakit.load(tmp_path / "half")
    for key, m in a.modules.items():
        want = dense_cols(m, list(range(0, m.rank, 2)))
        assert rel(dense(back.modules[key]), want) < TOL
    assert set(back.extras) == set(a.extras)


def test_refusals_are_named():
    g = torch.Generator().manual_seed(9)
    m = _module(g, 6, 4, 2, 2.0)
    dora = Adapter(modules={"q": LoraModule(m.down, m.up, 2.0, magnitude=torch.ones(6))})
    with pytest.raises(UnsupportedVariantError, match="DoRA") as e:
        split(dora)
    assert e.value.key == "q"
    with pytest.raises(UnsupportedVariantError, match="bias"):
        split(Adapter(modules={"q": LoraModule(m.down, m.up, 2.0, bias=torch.ones(6))}))
    other = Adapter(modules={"q": _module(g, 7, 4, 2, 2.0)})
    with pytest.raises(IncompatibleAdaptersError, match="different shapes"):
        assemble(combine(split(Adapter(modules={"q": m})), split(other, source=1)))
    for bad in ({"top": 0}, {"energy": 0.0}, {"min_share": 1.5}, {"min_norm": -1},
                {"module_regex": "("}):
        with pytest.raises(OptionError):
            select(split(other), **bad)
    with pytest.raises(OptionError, match="unknown unit order"):
        reorder(split(other), "size")


def test_unit_module_and_lego_share_the_unit_type():
    # LoRA-LEGO (merge/lego.py) builds on these units: with k >= all units it equals cat
    a, b = _pair(10)
    lego = lorakit.merge([a, b], "lego", [1.0, 0.5], k=20, param_reweight=False,
                         extras="first")
    cat = lorakit.merge([a, b], "cat", [1.0, 0.5], extras="first")
    for key in cat.modules:
        assert rel(dense(lego.modules[key]), dense(cat.modules[key])) < TOL
    us = split(a)["l.0.conv"]
    assert unit_module(us).down.shape == a.modules["l.0.conv"].down.shape
