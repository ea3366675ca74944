"""resize: Eckart-Young optimal per module, exact at full rank, CLI and report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lorakit
from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.cli import cli
from lorakit.errors import UnsupportedVariantError
from lorakit.lowrank import RankPolicy


def dense(m: LoraModule) -> np.ndarray:
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
        "c.conv": LoraModule(torch.randn(5, 4, 3, 3, generator=g),
                             torch.randn(9, 5, 1, 1, generator=g), 5.0, kind=ModuleKind.CONV),
    }
    return Adapter(modules=mods)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_resize_error_is_eckart_young_optimum(k):
    ad = _adapter()
    small, report = lorakit.resize(ad, RankPolicy.fixed(k))
    by_key = {m.key: m for m in report.modules}
    for key, m in ad.modules.items():
        d = dense(m)
        s = np.linalg.svd(d, compute_uv=False)
        kk = min(k, m.rank)
        optimum = np.sqrt((s[kk:] ** 2).sum())
        err = np.linalg.norm(dense(small.modules[key]) - d)
        norm = np.linalg.norm(d)
        assert err <= optimum * (1 + 1e-6) + 1e-6 * norm, key
        if norm > 0:
            # the report comes from the float32-route spectrum: tails are accurate to ~1e-5
            assert by_key[key].rel_error == pytest.approx(optimum / norm, abs=1e-5)
        assert not any(torch.isnan(t).any() for t in (small.modules[key].up,
                                                        small.modules[key].down))


def test_full_rank_reproduces_every_delta():
    ad = _adapter(1)
    small, _ = lorakit.resize(ad, RankPolicy.fixed(64))
    for key, m in ad.modules.items():
        d = dense(m)
        got = dense(small.modules[key])
        assert np.linalg.norm(got - d) <= 1e-6 * max(np.linalg.norm(d), 1e-12), key
        assert small.modules[key].kind is m.kind
        assert small.modules[key].down.shape[1:] == m.down.shape[1:]


def test_conv_rank_and_energy_policy():
    ad = _adapter(2)
    small, _ = lorakit.resize(ad, RankPolicy.from_options(energy=0.999, conv_rank=2))
    assert small.modules["c.conv"].rank == 2
    for key in ("a.q", "a.v"):
        s = np.linalg.svd(dense(ad.modules[key]), compute_uv=False)
        e = np.cumsum(s ** 2) / (s ** 2).sum()
        assert small.modules[key].rank == int(np.argmax(e >= 0.999 - 1e-12)) + 1


def test_dora_is_refused_by_name():
    ad = Adapter(modules={"q": LoraModule(torch.ones(2, 3), torch.ones(4, 2), 2.0,
                                          magnitude=torch.ones(4))}, source="dora.safetensors")
    with pytest.raises(UnsupportedVariantError, match="dora.safetensors.*'q'.*DoRA"):
        lorakit.resize(ad, RankPolicy.fixed(1))


def test_budget_policy_respects_budget():
    ad = _adapter(3)
    small, report = lorakit.resize(ad, RankPolicy.from_options(budget=0.5))
    assert report.params_after <= 0.5 * report.params_before + 1e-9


def test_cli_resize_writes_peft_with_rank_pattern(tmp_path):
    ad = _adapter(4)
    ad.modules.pop("c.conv")
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
