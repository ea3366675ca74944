"""LoRA-Squeeze post-hoc: the exact route is resize, the randomized route is near-optimal and
seeded; Cont-Squeeze recovery steps; the ``squeeze`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lorakit
from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.cli import cli
from lorakit.compress.squeeze import SqueezeOptions, SqueezeRoute, squeeze
from lorakit.errors import OptionError, UnsupportedVariantError
from lorakit.lowrank import RankPolicy


def dense(m: LoraModule) -> np.ndarray:
    """``scale * B @ A`` in float64, computed here independently of lorakit."""
    r = m.down.shape[0]
    scale = m.alpha / (np.sqrt(r) if m.rslora else r)
    return scale * m.up.double().numpy().reshape(m.up.shape[0], r) @ \
        m.down.double().numpy().reshape(r, -1)


def _adapter(seed=0, r=32):
    g = torch.Generator().manual_seed(seed)
    mods = {
        "l.q": LoraModule(torch.randn(r, 80, generator=g), torch.randn(96, r, generator=g), 16.0),
        "l.v": LoraModule(torch.randn(r // 2, 80, generator=g),
                          torch.randn(64, r // 2, generator=g), 8.0, rslora=True),
        "l.conv": LoraModule(torch.randn(12, 6, 3, 3, generator=g),
                             torch.randn(20, 12, 1, 1, generator=g), 12.0,
                             kind=ModuleKind.CONV),
    }
    return Adapter(modules=mods)


@pytest.mark.parametrize("policy", [RankPolicy.fixed(4), RankPolicy.from_options(energy=0.8),
                                    RankPolicy.from_options(budget=0.3)])
@pytest.mark.parametrize("method", [SqueezeRoute.AUTO, SqueezeRoute.EXACT])
def test_exact_route_equals_resize(policy, method):
    ad = _adapter()
    got, rep = squeeze(ad, policy, method=method)
    ref, ref_rep = lorakit.resize(ad, policy)
    assert rep.route == "exact" and rep.to_dict()["route"] == "exact"
    for key, m in ref.modules.items():
        assert torch.equal(got.modules[key].down, m.down) and torch.equal(got.modules[key].up, m.up)
        assert got.modules[key].alpha == m.alpha
    assert rep.to_dict()["modules"] == ref_rep.to_dict()["modules"]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_randomized_is_within_1_01_of_the_optimum(k):
    ad = _adapter(1)
    small, rep = squeeze(ad, RankPolicy.fixed(k), method="randomized", seed=3)
    assert rep.route == "randomized"
    by_key = {m.key: m for m in rep.modules}
    for key, m in ad.modules.items():
        d = dense(m)
        s = np.linalg.svd(d, compute_uv=False)
        optimum = np.sqrt((s[k:] ** 2).sum())
        new = small.modules[key]
        assert new.rank == k and new.kind is m.kind and new.down.shape[1:] == m.down.shape[1:]
        assert new.dtype == m.dtype and new.alpha == k
        err = np.linalg.norm(dense(new) - d)
        assert err <= 1.01 * optimum, (key, err / optimum)
        assert by_key[key].rel_error == pytest.approx(err / np.linalg.norm(d), rel=1e-2)


def test_randomized_is_seeded_and_matches_exact_ranks_for_dynamic_policies():
    ad = _adapter(2)
    policy = RankPolicy.from_options(energy=0.9)
    a, _ = squeeze(ad, policy, method="randomized", seed=5)
    b, _ = squeeze(ad, policy, method="randomized", seed=5)
    c, _ = squeeze(ad, policy, method="randomized", seed=6)
    exact, _ = squeeze(ad, policy)
    for key in ad.modules:
        assert torch.equal(a.modules[key].down, b.modules[key].down)
        assert torch.equal(a.modules[key].up, b.modules[key].up)
        # all r triplets are computed for a dynamic policy: the rank is the exact route's
        assert a.modules[key].rank == exact.modules[key].rank == c.modules[key].rank
        s = np.linalg.svd(dense(ad.modules[key]), compute_uv=False)
        e = np.cumsum(s ** 2) / (s ** 2).sum()
        assert a.modules[key].rank == int(np.argmax(e >= 0.9 - 1e-12)) + 1
        np.testing.assert_allclose(dense(a.modules[key]), dense(exact.modules[key]),
                                   atol=1e-4 * np.abs(dense(exact.modules[key])).max())


def test_randomized_budget_and_conv_rank():
    ad = _adapter(3)
    small, rep = squeeze(ad, RankPolicy.from_options(budget=0.25), method="randomized")
    assert rep.params_after <= 0.25 * rep.params_before
    small, _ = squeeze(ad, RankPolicy.from_options(rank=6, conv_rank=2), method="randomized")
    assert small.ranks() == {"l.q": 6, "l.v": 6, "l.conv": 2}


def test_refusals_and_option_errors():
    ad = Adapter(modules={"q": LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0,
                                          magnitude=torch.ones(4))}, source="dora.safetensors")
    for method in ("exact", "randomized"):
        with pytest.raises(UnsupportedVariantError, match="dora.safetensors.*'q'.*DoRA"):
            squeeze(ad, RankPolicy.fixed(1), method=method)
    with pytest.raises(OptionError, match="unknown squeeze method 'svd'.*randomized"):
        SqueezeOptions(method="svd")
    with pytest.raises(OptionError, match="oversample and n_iter must be >= 0"):
        SqueezeOptions(n_iter=-1)


def test_cli_squeeze_randomized(tmp_path):
    ad = _adapter(4)
    ad.modules.pop("l.conv")
    src = lorakit.save(ad, tmp_path / "src", "peft")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["squeeze", str(src), "-o", str(out), "--rank", "3",
                                   "--method", "randomized", "--seed", "1", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["route"] == "randomized"
    assert {m["key"]: m["rank_after"] for m in info["modules"]} == {"l.q": 3, "l.v": 3}
    assert lorakit.load(out).ranks() == {"l.q": 3, "l.v": 3}
    res2 = CliRunner().invoke(cli, ["squeeze", str(src), "-o", str(out), "--rank", "2"])
    assert res2.exit_code != 0 and "already exists" in str(res2.exception or res2.output)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_continue_training_recovers_at_the_target_rank():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lorakit.compress.squeeze import continue_training

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"]))
    seq = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))

    def loss_fn(m, batch):
        return m(input_ids=batch, labels=batch).loss

    continue_training(model, loss_fn, [seq], steps=5, lr=1e-2)  # a "trained" rank-8 model
    res = continue_training(model, loss_fn, [seq], steps=8, lr=1e-2, rank=2)
    assert set(res.shrink.ranks().values()) == {2}
    assert {lay.r["default"] for lay in _lora(model)} == {2}
    assert model.peft_config["default"].r == 2
    assert all(np.isfinite(res.losses)) and res.losses[-1] < res.losses[0]
    with pytest.raises(OptionError, match="batches ran out after 0 of 1 steps"):
        continue_training(model, loss_fn, iter([]), steps=1)


def _lora(model):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]
