"""resize: Eckart-Young optimal per module, exact at full rank, kohya's alpha convention, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import lorakit
import lorakit.compress.resize as resize_mod
from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.cli import cli
from lorakit.errors import UnsupportedVariantError
from lorakit.lowrank import RankPolicy


def dense(m: LoraModule) -> np.ndarray:
    """``scale * B @ A`` from the raw factors, independently of LoraModule.delta."""
    r = m.down.shape[0]
    scale = m.alpha / (np.sqrt(r) if m.rslora else r)
    return scale * m.up.double().numpy().reshape(m.up.shape[0], r) @ \
        m.down.double().numpy().reshape(r, -1)


def _adapter(seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = {
        "a.q": LoraModule(torch.randn(8, 20, generator=g), torch.randn(30, 8, generator=g), 16.0),
        "a.v": LoraModule(torch.randn(4, 20, generator=g), torch.randn(12, 4, generator=g), 4.0,
                          rslora=True),
        "a.z": LoraModule(torch.randn(6, 20, generator=g), torch.zeros(30, 6), 6.0),
        "a.d": LoraModule(torch.cat([torch.randn(3, 20, generator=g)] * 2),
                          torch.randn(30, 6, generator=g), 6.0),  # rank-deficient
        "a.n": LoraModule(torch.randn(5, 20, generator=g), torch.randn(30, 5, generator=g), -2.0),
        "c.conv": LoraModule(torch.randn(5, 4, 3, 3, generator=g),
                             torch.randn(9, 5, 1, 1, generator=g), 5.0, kind=ModuleKind.CONV),
    }
    return Adapter(modules=mods, extras={"head.weight": torch.ones(3)},
                   config={"r": 8, "lora_alpha": 16}, metadata={"k": "v"}, source="mem")


def _optimum(d: np.ndarray, k: int) -> float:
    s = scipy.linalg.svd(d, compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum()))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_resize_error_is_eckart_young_optimum(k):
    ad = _adapter()
    # float64 output factors: the float32 inputs' own rounding would hide a 1e-9 check
    small, report = lorakit.resize(ad, RankPolicy.fixed(k), dtype=torch.float64)
    by_key = {m.key: m for m in report.modules}
    for key, m in ad.modules.items():
        d = dense(m)
        kk = min(k, m.rank)
        optimum, norm = _optimum(d, kk), np.linalg.norm(d)
        err = np.linalg.norm(dense(small.modules[key]) - d)
        assert abs(err - optimum) <= 1e-6 * optimum + 1e-9 * norm, key
        assert small.modules[key].rank == kk
        if norm > 0:
            assert by_key[key].rel_error == pytest.approx(optimum / norm, rel=1e-6, abs=1e-9)
            assert by_key[key].energy_kept == pytest.approx(1 - (optimum / norm) ** 2, abs=1e-9)
        else:
            assert by_key[key].rel_error == 0.0 and by_key[key].energy_kept == 1.0
        new = small.modules[key]
        assert torch.isfinite(new.up).all() and torch.isfinite(new.down).all()


def test_full_rank_reproduces_every_delta():
    ad = _adapter(1)
    small, report = lorakit.resize(ad, RankPolicy.fixed(64))
    for key, m in ad.modules.items():
        d, got = dense(m), dense(small.modules[key])
        assert np.linalg.norm(got - d) <= 1e-6 * max(np.linalg.norm(d), 1e-12), key
        assert small.modules[key].kind is m.kind
        assert small.modules[key].down.shape[1:] == m.down.shape[1:]
        assert small.modules[key].up.shape[2:] == m.up.shape[2:]
    assert report.total_rel_error <= 1e-7


def test_full_rank_on_the_float32_route():
    """A module large enough for float32 tall products is still reproduced at full rank."""
    g = torch.Generator().manual_seed(2)
    m = LoraModule(torch.randn(64, 2200, generator=g) / 50, torch.randn(2100, 64, generator=g)
                   * torch.logspace(0, -3, 64), 128.0)
    small, _ = lorakit.resize(Adapter(modules={"big": m}), RankPolicy.fixed(64))
    d, got = dense(m), dense(small.modules["big"])
    assert np.linalg.norm(got - d) <= 1e-6 * np.linalg.norm(d)
    small, _ = lorakit.resize(Adapter(modules={"big": m}), RankPolicy.fixed(16))
    err = np.linalg.norm(dense(small.modules["big"]) - d)
    assert err <= _optimum(d, 16) * (1 + 1e-6)


def test_kohya_alpha_convention_and_balanced_factors():
    ad = _adapter(3)
    small, _ = lorakit.resize(ad, RankPolicy.fixed(2))
    q, v, n = small.modules["a.q"], small.modules["a.v"], small.modules["a.n"]
    assert q.alpha == pytest.approx(ad.modules["a.q"].scale * 2) and not q.rslora  # 16/8 * 2
    assert q.scale == pytest.approx(ad.modules["a.q"].scale)
    assert v.rslora and v.scale == pytest.approx(ad.modules["a.v"].scale)
    assert v.alpha == pytest.approx(ad.modules["a.v"].scale * np.sqrt(2))
    # a negative scale is kept too (README: resize keeps each module's scale), sign in B
    assert n.scale < 0 and n.scale == pytest.approx(ad.modules["a.n"].scale)
    assert n.alpha == pytest.approx(ad.modules["a.n"].scale * 2)
    for new in (q, v, n):  # balanced: column j of B and row j of A have equal norms
        np.testing.assert_allclose(torch.linalg.norm(new.up, dim=0).numpy(),
                                   torch.linalg.norm(new.down, dim=1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("alpha", [-6.0, -0.5, 0.0])
def test_zero_and_negative_alpha_keep_the_scale(alpha):
    """The update and the scale survive a resize whatever alpha's sign (checked on the dense
    ``scale * B @ A`` against numpy's SVD optimum); a zero alpha stays zero with a zero update."""
    g = torch.Generator().manual_seed(7)
    m = LoraModule(torch.randn(6, 20, generator=g), torch.randn(12, 6, generator=g), alpha)
    small, _ = lorakit.resize(Adapter(modules={"k": m}), RankPolicy.fixed(3))
    new = small.modules["k"]
    assert new.scale == pytest.approx(m.scale) and new.alpha == pytest.approx(m.scale * 3)
    d = dense(m)
    got = dense(new)
    if alpha == 0:
        assert np.count_nonzero(got) == 0 and np.count_nonzero(d) == 0
    else:
        assert np.linalg.norm(got - d) <= _optimum(d, 3) * (1 + 1e-6)
    full, _ = lorakit.resize(Adapter(modules={"k": m}), RankPolicy.fixed(6))
    np.testing.assert_allclose(dense(full.modules["k"]), d, atol=1e-4 * (1 + np.abs(d).max()))


def test_dtype_is_kept_or_overridden_and_input_untouched():
    ad = _adapter(4)
    ad.modules["a.q"] = LoraModule(ad.modules["a.q"].down.half(), ad.modules["a.q"].up.half(), 16.0)
    before = {k: (m.down.clone(), m.up.clone()) for k, m in ad.modules.items()}
    small, _ = lorakit.resize(ad, RankPolicy.fixed(2))
    assert small.modules["a.q"].dtype == torch.float16 and small.modules["a.v"].dtype == torch.float32
    assert lorakit.resize(ad, RankPolicy.fixed(2), dtype=torch.float64)[0].modules["a.q"].dtype \
        == torch.float64
    for k, m in ad.modules.items():
        assert torch.equal(m.down, before[k][0]) and torch.equal(m.up, before[k][1])


def test_adapter_fields_are_carried_and_copied():
    ad = _adapter(5)
    small, _ = lorakit.resize(ad, RankPolicy.fixed(1))
    assert small.extras.keys() == ad.extras.keys() and small.extras is not ad.extras
    assert small.config == ad.config and small.config is not ad.config
    assert small.metadata == ad.metadata and small.metadata is not ad.metadata
    assert list(small.modules) == list(ad.modules)


def test_equal_shapes_are_batched_with_the_same_result():
    g = torch.Generator().manual_seed(6)
    mods = {f"l{i}": LoraModule(torch.randn(6, 40, generator=g), torch.randn(50, 6, generator=g),
                                12.0) for i in range(7)}
    together, _ = lorakit.resize(Adapter(modules=mods), RankPolicy.fixed(3))
    for key, m in mods.items():
        alone, _ = lorakit.resize(Adapter(modules={key: m}), RankPolicy.fixed(3))
        np.testing.assert_allclose(dense(together.modules[key]), dense(alone.modules[key]),
                                   rtol=1e-9, atol=1e-12)


def test_conv_rank_and_energy_policy():
    ad = _adapter(2)
    small, _ = lorakit.resize(ad, RankPolicy.from_options(energy=0.999, conv_rank=2))
    assert small.modules["c.conv"].rank == 2
    for key in ("a.q", "a.v"):
        s = scipy.linalg.svd(dense(ad.modules[key]), compute_uv=False)
        e = np.cumsum(s ** 2) / (s ** 2).sum()
        assert small.modules[key].rank == int(np.argmax(e >= 0.999 - 1e-12)) + 1


def test_dora_is_refused_by_name():
    ad = Adapter(modules={"q": LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0,
                                          magnitude=torch.ones(4))}, source="dora.safetensors")
    with pytest.raises(UnsupportedVariantError, match="dora.safetensors: key 'q': DoRA"):
        lorakit.resize(ad, RankPolicy.fixed(1))


def test_budget_respects_budget_and_core_reuse_changes_nothing(monkeypatch):
    ad = _adapter(3)
    small, report = lorakit.resize(ad, RankPolicy.from_options(budget=0.5))
    assert report.params_after <= 0.5 * report.params_before
    monkeypatch.setattr(resize_mod, "CORE_CACHE_BYTES", 0)  # recompute the Grams instead
    again, _ = lorakit.resize(ad, RankPolicy.from_options(budget=0.5))
    for key, m in small.modules.items():
        assert torch.equal(m.up, again.modules[key].up) and m.alpha == again.modules[key].alpha


def test_report_totals_progress_and_json():
    ad = _adapter(7)
    seen: list[str] = []
    small, report = lorakit.resize(ad, RankPolicy.fixed(2), progress=seen.append)
    assert sorted(seen) == sorted(ad.modules)
    num = sum(np.linalg.norm(dense(small.modules[k]) - dense(m)) ** 2 for k, m in ad.modules.items())
    den = sum(np.linalg.norm(dense(m)) ** 2 for m in ad.modules.values())
    assert report.total_rel_error == pytest.approx(np.sqrt(num / den), rel=1e-6)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["n_modules"] == len(ad.modules) and d["params_after"] == small.num_params()
    assert d["total_energy_kept"] == pytest.approx(1 - report.total_rel_error ** 2)
    assert {m["key"] for m in d["modules"]} == set(ad.modules)
    assert set(d["modules"][0]) == {"key", "rank_before", "rank_after", "energy_kept", "rel_error"}


def test_cli_resize_writes_peft_with_rank_pattern(tmp_path):
    ad = _adapter(4)
    for key in ("c.conv", "a.n"):
        ad.modules.pop(key)
    src = lorakit.save(ad, tmp_path / "src", "peft")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["resize", str(src), "-o", str(out), "--energy", "0.9",
                                   "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert {m["key"] for m in info["modules"]} == set(ad.modules)
    back = lorakit.load(out)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {k: m.rank for k, m in back.modules.items()}
    assert ranks == {m["key"]: m["rank_after"] for m in info["modules"]}
    if len(set(ranks.values())) > 1:
        assert config["rank_pattern"]
    res2 = CliRunner().invoke(cli, ["resize", str(src), "-o", str(out), "--rank", "2"])
    assert res2.exit_code != 0 and "already exists" in str(res2.exception or res2.output)
