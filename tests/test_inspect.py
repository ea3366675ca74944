"""``lorakit inspect`` on the real adapters: ranks and scales match the MANIFEST and the config, and
the singular values equal a dense numpy SVD of the update computed here."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import manifest_params, require_real
from formats._raw import norm_key, read_any
from formats.helpers import peft_pair, write_peft

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.cli import cli

N_DENSE = 3  # modules per adapter checked against a dense SVD (the cheapest ones)


def run_inspect(*args: str) -> str:
    res = CliRunner().invoke(cli, ["inspect", *args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.stdout


def _expected_scale(entry: dict, cfg: dict, rank: int) -> float | None:
    """The scale the MANIFEST / config define for a module of this rank (None: not given)."""
    alpha = entry.get("lora_alpha")
    if alpha is None:
        return None
    if str(cfg.get("peft_type", "LORA")).upper() == "ADALORA":
        return alpha / float(np.float32(rank) + np.float32(1e-5))  # PEFT's float32 ranknum
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


@pytest.mark.real
@pytest.mark.parametrize("entry", manifest_params())
def test_inspect_json_matches_manifest_config_and_dense_svd(entry):
    folder = require_real(entry["name"])
    info = json.loads(run_inspect(str(folder), "--json"))
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    assert info["n_modules"] == len(info["modules"]) == entry["n_lora_pairs"]
    ranks = Counter(str(m["rank"]) for m in info["modules"])
    assert dict(ranks) == {k: int(v) for k, v in entry["ranks_found"].items()}
    assert info["ranks"] == sorted(int(r) for r in entry["ranks_found"])
    assert info["format"] == {"peft": "peft", "kohya": "kohya"}.get(
        entry["format"].split("_")[0], "diffusers")
    if cfg:
        assert info["base_model"] == cfg.get("base_model_name_or_path")
        if str(cfg.get("peft_type")).upper() == "LORA" and not cfg.get("rank_pattern"):
            assert info["ranks"] == [cfg["r"]] == [entry["r"]]

    raw = read_any(folder)  # the file read without lorakit
    for m in info["modules"]:
        ref = raw[norm_key(m["key"])]
        assert m["rank"] == ref.rank
        assert m["scale"] == pytest.approx(ref.scale, rel=1e-12), m["key"]
        want = _expected_scale(entry, cfg, m["rank"])
        if want is not None:
            assert m["scale"] == pytest.approx(want, rel=1e-12), m["key"]
        if cfg and str(cfg.get("peft_type")).upper() == "LORA" and not cfg.get("alpha_pattern"):
            assert m["alpha"] == cfg["lora_alpha"]
        # ||delta||_F from the factors' Gram matrices (exact, cheap): s^2 tr(B^T B A A^T)
        gram = ref.scale ** 2 * float(np.sum((ref.up.T @ ref.up) * (ref.down @ ref.down.T)))
        assert m["norm"] == pytest.approx(math.sqrt(max(gram, 0.0)), rel=1e-9, abs=1e-12)
        assert len(m["singular_values"]) == m["rank"] == len(m["energy"])
        s = np.asarray(m["singular_values"])
        assert np.all(np.diff(s) <= 1e-12 * max(s[0], 1e-300))  # descending
        assert 0 <= m["effective_rank"] <= m["rank"]
        if s[0] > 0:
            assert m["energy"][-1] == pytest.approx(1.0, abs=1e-9)
    assert info["scales"] == sorted({m["scale"] for m in info["modules"]})

    # singular values == a dense SVD of scale * B @ A, on the cheapest modules
    cheapest = sorted(info["modules"], key=lambda m: math.prod(m["shape"]))[:N_DENSE]
    for m in cheapest:
        ref = raw[norm_key(m["key"])]
        dense = np.linalg.svd(ref.delta(), compute_uv=False)
        got = np.asarray(m["singular_values"])
        k = min(len(dense), len(got))
        tol = 1e-12 * max(dense[0], 1e-300)
        np.testing.assert_allclose(got[:k], dense[:k], rtol=1e-5, atol=tol, err_msg=m["key"])
        assert np.all(np.abs(got[k:]) <= 1e-9 * max(dense[0], 1e-300))  # rank > min(out, in)


@pytest.mark.real
def test_inspect_json_several_adapters():
    a, b = require_real("gpt2_r4_jhess"), require_real("sd15_kohyalike_timohavdk")
    infos = json.loads(run_inspect(str(a), str(b), "--json"))
    assert [i["n_modules"] for i in infos] == [36, 128]
    assert [i["format"] for i in infos] == ["peft", "kohya"]
    assert infos[0]["scales"] == [4.0] and infos[1]["scales"] == [1.0]
    assert infos[1]["components"] == ["unet"] and infos[0]["components"] == []


@pytest.mark.real
def test_inspect_table_lists_modules_and_ranks():
    folder = require_real("gpt2_r4_jhess")
    out = run_inspect(str(folder))
    assert "peft (peft)" in out and "gpt2" in out
    rows = [line for line in out.splitlines() if "transformer.h." in line]
    assert len(rows) == 36
    for layer in range(12):
        for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_proj"):
            key = f"transformer.h.{layer}.{mod}"
            row = next(line for line in rows if re.search(rf"\b{re.escape(key)}\s", line))
            cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
            assert cells[:4] == [key, "4", "16", "4"], row  # module, r, alpha, scale


@pytest.mark.real
def test_inspect_table_truncates_long_adapters():
    out = run_inspect(str(require_real("sd15_diffusers_catundchat")), "--max-rows", "5")
    assert "diffusers (diffusers_legacy_processor)" in out
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k" in out
    assert "123 more modules" in out


def test_inspect_table_mixed_ranks(tmp_path):
    """A synthetic PEFT adapter with a rank_pattern: the table shows each module's own rank."""
    keys = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 6}
    tensors = {}
    for i, (k, r) in enumerate(keys.items()):
        tensors.update(peft_pair(k, r, 12, 10, seed=i))
    folder = write_peft(tmp_path / "mixed", {"r": 6, "lora_alpha": 12,
                                             "rank_pattern": {"q_proj": 2},
                                             "target_modules": ["q_proj", "v_proj"]}, tensors)
    out = run_inspect(str(folder))
    for k, r in keys.items():
        row = next(line for line in out.splitlines() if k in line)
        cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
        assert cells[:4] == [k, str(r), "12", f"{12 / r:.4g}"]
    info = json.loads(run_inspect(str(folder), "--json"))
    assert info["ranks"] == [2, 6] and info["scales"] == [2.0, 6.0]
    for m in info["modules"]:
        a = tensors[f"base_model.model.{m['key']}.lora_A.weight"].double().numpy()
        b = tensors[f"base_model.model.{m['key']}.lora_B.weight"].double().numpy()
        dense = np.linalg.svd(12 / m["rank"] * b @ a, compute_uv=False)[: m["rank"]]
        np.testing.assert_allclose(m["singular_values"], dense, rtol=1e-5)


def test_no_spectra_reports_no_made_up_zeros(tmp_path):
    m = LoraModule(torch.randn(2, 6), torch.randn(5, 2), alpha=2.0)
    src = lorakit.save(Adapter(modules={"model.layers.0.q_proj": m}), tmp_path / "a", "peft")
    res = CliRunner().invoke(cli, ["inspect", str(src), "--json", "--no-spectra"])
    assert res.exit_code == 0, res.output
    mod = json.loads(res.output)["modules"][0]
    assert mod["rank"] == 2 and mod["effective_rank"] is None and mod["norm"] is None
    table = CliRunner().invoke(cli, ["inspect", str(src), "--no-spectra"])
    assert table.exit_code == 0 and "model.layers.0.q_proj" in table.output
