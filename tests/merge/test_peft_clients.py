"""PEFT as a real client: both adapters active == our cat merge; add_weighted_adapter where it is
exact (cat, svd) matches ours; where it is not (linear, ties on A and B separately) the
difference is documented on a minimal case."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.lowrank import RankPolicy
from tests.conftest import real_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.conformance


@pytest.fixture(scope="module")
def gpt2_base():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12)).eval()


def _peft_delta(model, key, name):
    layer = model.base_model.model.get_submodule(key)
    d = layer.get_delta_weight(name)
    return d.T if layer.fan_in_fan_out else d  # lorakit's frame is (out, in)


def _rel(x, y):
    return float((x - y).norm() / y.norm())


def test_two_active_adapters_equal_our_cat(gpt2_base, tmp_path):
    a_dir, b_dir = real_adapter("gpt2_r4_jhess"), real_adapter("gpt2_tigrinya")
    both = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2_base), str(a_dir), adapter_name="a")
    both.load_adapter(str(b_dir), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    merged = lorakit.merge([lorakit.load(a_dir), lorakit.load(b_dir)], "cat")
    out = lorakit.save(merged, tmp_path / "cat", "peft")
    ours = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2_base), str(out)).eval()
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = both(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        bare = gpt2_base(input_ids=ids).logits
    assert float((want - bare).abs().max()) > 1e-4  # the adapters do change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("comb,rank", [("cat", None), ("svd", 6), ("svd", 12)])
def test_add_weighted_adapter_matches_where_exact(gpt2_base, comb, rank):
    a_dir, b_dir = real_adapter("gpt2_r4_jhess"), real_adapter("gpt2_tigrinya")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2_base), str(a_dir), adapter_name="a")
    model.load_adapter(str(b_dir), adapter_name="b")
    kwargs = {"svd_rank": rank} if rank else {}
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "m", combination_type=comb, **kwargs)
    ads = [lorakit.load(a_dir), lorakit.load(b_dir)]
    policy = RankPolicy.fixed(rank) if rank else None
    ours = lorakit.merge(ads, comb, [1.0, 0.5], policy=policy)
    for key, m in ours.modules.items():
        # cat and full-rank svd: equal updates; truncated svd: both are the Eckart-Young
        # truncation of the same sum (unique when the singular values are distinct)
        assert _rel(m.delta(), _peft_delta(model, key, "m")) < 5e-5, key


def test_peft_linear_is_factor_wise_and_inexact(gpt2_base):
    """PEFT's `linear` sums A and B separately: it equals our `factor_linear`, not the sum."""
    a_dir, b_dir = real_adapter("gpt2_anirudh"), real_adapter("gpt2_stathopoan")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2_base), str(a_dir), adapter_name="a")
    model.load_adapter(str(b_dir), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "lin", combination_type="linear")
    ads = [lorakit.load(a_dir), lorakit.load(b_dir)]
    exact = lorakit.merge(ads, "linear", extras="first")
    factor = lorakit.merge(ads, "factor_linear", extras="first")
    key = "transformer.h.0.attn.c_attn"
    peft_delta = _peft_delta(model, key, "lin")
    assert _rel(peft_delta, exact.modules[key].delta()) > 1e-2  # cross terms B_a A_b + B_b A_a
    assert _rel(peft_delta, factor.modules[key].delta()) < 1e-5


def test_minimal_case_cross_terms():
    """Two rank-1 adapters on orthogonal directions: the true sum has no B_1 A_2 term."""
    a = lorakit.Adapter(modules={"q": lorakit.LoraModule(torch.tensor([[1.0, 0.0]]),
                                                         torch.tensor([[1.0], [0.0]]), 1.0)})
    b = lorakit.Adapter(modules={"q": lorakit.LoraModule(torch.tensor([[0.0, 1.0]]),
                                                         torch.tensor([[0.0], [1.0]]), 1.0)})
    exact = lorakit.merge([a, b], "linear").modules["q"].delta()
    factor = lorakit.merge([a, b], "factor_linear").modules["q"].delta()
    torch.testing.assert_close(exact, torch.eye(2))
    torch.testing.assert_close(factor, torch.ones(2, 2))  # off-diagonals are the cross terms


def test_peft_ties_trims_factors_not_the_update(gpt2_base):
    """PEFT's `ties` trims and elects signs on A and on B separately; the product is not TIES of
    the updates, which is what lorakit's `ties` computes (exact at full rank)."""
    a_dir, b_dir = real_adapter("gpt2_anirudh"), real_adapter("gpt2_stathopoan")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2_base), str(a_dir), adapter_name="a")
    model.load_adapter(str(b_dir), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "t", combination_type="ties", density=0.5)
    from lorakit.merge.options import DisjointMerge, SignMethod
    from lorakit.merge.sparsify import disjoint_merge, elect_sign, trim_magnitude

    key = "transformer.h.0.attn.c_attn"
    mods = [lorakit.load(d).modules[key] for d in (a_dir, b_dir)]
    tau = torch.stack([m.delta() for m in mods])
    trimmed = trim_magnitude(tau, 0.5)
    reference = disjoint_merge(trimmed, elect_sign(trimmed, SignMethod.TOTAL), DisjointMerge.MEAN)
    assert _rel(_peft_delta(model, key, "t"), reference) > 1e-2
