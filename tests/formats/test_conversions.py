"""PEFT <-> diffusers <-> kohya conversions of the real adapters keep every module's update.

The reference is always the source file read without lorakit (tests/formats/_raw.py); deltas
``scale * B @ A`` are compared in float32 with a relative error bound of 1e-6. Some conversions go
through the CLI (click's CliRunner, and one subprocess for the one-line error contract), the rest
through the Python API.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, manifest_params, require_real

import lorakit
from lorakit.cli import cli
from lorakit.errors import OutputExistsError

from ._raw import RawModule, read_any, rel_err, strip_component

pytestmark = pytest.mark.real
F32 = np.float32
TOL = 1e-6


def run_convert(src: Path, to: str, out: Path, *extra: str) -> Path:
    """``lorakit convert`` through click's CliRunner; returns the path written."""
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", to, "-o", str(out), *extra])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "wrote" in res.output
    return out


def api_convert(src: Path, to: str, out: Path, component: str | None = None) -> Path:
    a = lorakit.load(src)
    return lorakit.save(lorakit.convert(a, to, component=component), out, to)


def assert_same_updates(ref: dict[str, RawModule], *stages: dict[str, RawModule]) -> None:
    """Same module keys; every stage's deltas equal the reference within 1e-6 relative error in
    float32 (each reference delta is materialised once and compared with every stage)."""
    for got in stages:
        assert sorted(got) == sorted(ref)
    for k, m in ref.items():
        d_ref = m.delta(F32)
        for i, got in enumerate(stages):
            err = rel_err(got[k].delta(F32), d_ref)
            assert err < TOL, (i, k, err)


def assert_same_factors(got: dict[str, RawModule], ref: dict[str, RawModule]) -> None:
    """Bit-identical factors and equal scales (hence identical updates); cheap for big adapters."""
    assert sorted(got) == sorted(ref)
    for k, m in ref.items():
        assert np.array_equal(got[k].up, m.up) and np.array_equal(got[k].down, m.down), k
        assert got[k].scale == pytest.approx(m.scale, rel=1e-12), k


# --------------------------------------------------------------------------- SD1.5 adapters

SD15 = {
    "sd15_diffusers_timohavdk_step2100": "diffusers_lora_down_up",
    "sd15_diffusers_catundchat": "diffusers_legacy_processor",
    "sd15_diffusers_pokemon": "diffusers_legacy_processor",
    "sd15_kohyalike_timohavdk": "kohya_like",
}


@pytest.mark.parametrize("name", list(SD15))
def test_sd15_through_every_format(name, tmp_path):
    """source -> kohya (CLI) -> PEFT (API) -> diffusers (CLI) -> kohya (API)."""
    src = require_real(name)
    a = lorakit.load(src)
    assert a.layout == SD15[name] and a.components() == ["unet"]
    ref = read_any(src)
    assert all(k.startswith("unet_") for k in ref)

    kohya = run_convert(src, "kohya", tmp_path / "a.safetensors")
    peft = api_convert(kohya, "peft", tmp_path / "b_peft", component="unet")
    diff = run_convert(peft, "diffusers", tmp_path / "c.safetensors", "--component", "unet")
    kohya2 = api_convert(diff, "kohya", tmp_path / "d.safetensors")

    stages = {"kohya": read_any(kohya), "peft": {f"unet_{k}": m for k, m in
                                               read_any(peft).items()},
              "diffusers": read_any(diff), "kohya2": read_any(kohya2)}
    # Every stage holds bit-identical factors and equal scales; the last one, four conversions
    # away, is also compared on the dense float32 updates.
    for got in stages.values():
        assert_same_factors(got, ref)
    assert_same_updates(ref, stages["kohya2"])

    # The files themselves: standard kohya names, PEFT keys without the component, current
    # diffusers layout under unet.
    back = lorakit.load(diff)
    assert back.layout == "diffusers" and sorted(back.modules) == sorted(a.modules)
    assert sorted(lorakit.load(peft).modules) == sorted(k[len("unet."):] for k in a.modules)
    cfg = json.loads((peft / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (4, 4, {})
    # PEFT matches targets by trailing segments: "to_out.0", never a bare "0" (every *.0 block)
    assert sorted(cfg["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    k2 = lorakit.load(kohya2)
    assert k2.layout == "kohya" and sorted(k2.modules) == sorted(a.modules)
    with torch.no_grad():
        for key, m in a.modules.items():
            assert torch.equal(k2.modules[key].down, m.down)
            assert torch.equal(k2.modules[key].up, m.up)
            assert k2.modules[key].scale == m.scale


def test_kohyalike_to_diffusers_equals_timohavdk(tmp_path):
    """The hand-made kohya-like file converted to diffusers is the step-2100 diffusers file."""
    like = require_real("sd15_kohyalike_timohavdk")
    ref_dir = require_real("sd15_diffusers_timohavdk_step2100")
    out = run_convert(like, "diffusers", tmp_path / "like.safetensors")
    conv, ref = lorakit.load(out), lorakit.load(ref_dir)
    assert conv.layout == "diffusers" and ref.layout == "diffusers_lora_down_up"
    assert sorted(conv.modules) == sorted(ref.modules)
    assert len(conv.modules) == 128
    for key, m in ref.modules.items():
        c = conv.modules[key]
        assert torch.equal(c.down, m.down) and torch.equal(c.up, m.up), key
        assert c.alpha == m.alpha and c.scale == m.scale == 1.0, key
    # and without lorakit: the same module keys and bit-identical factors/scales on disk
    assert_same_factors(read_any(out), read_any(ref_dir))


def test_sd15_down_up_to_kohya_names(tmp_path):
    """A diffusers file written as kohya gets kohya's standard names and .alpha tensors."""
    src = require_real("sd15_diffusers_timohavdk_step2100")
    out = run_convert(src, "kohya", tmp_path / "k.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()  # noqa: SIM118
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert all(k.startswith("lora_unet_") and not k.startswith("lora_unet_unet_") for k in keys)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"


# ------------------------------------------------------------------ PEFT diffusion components


def test_peft_unet_to_diffusers_kohya_and_back(tmp_path):
    """PEFT UNet adapter -> diffusers (CLI) -> kohya (API) -> PEFT (CLI)."""
    src = require_real("sd15_unet_peft_faithsang")
    a = lorakit.load(src)
    ref = read_any(src)
    diff = run_convert(src, "diffusers", tmp_path / "d.safetensors")  # component from auto_mapping
    d = lorakit.load(diff)
    assert d.components() == ["unet"] and all(k.startswith("unet.") for k in d.modules)
    kohya = api_convert(diff, "kohya", tmp_path / "k.safetensors")
    assert all(n.startswith("unet_") for n in read_any(kohya))
    peft = run_convert(kohya, "peft", tmp_path / "p")
    b = lorakit.load(peft)
    assert list(b.modules) == list(a.modules)
    assert b.config["r"] == 4 and b.config["lora_alpha"] == 16
    assert b.config["auto_mapping"]["base_model_class"] == "UNet2DConditionModel"
    assert_same_updates(ref, strip_component(read_any(diff), "unet"),
                        strip_component(read_any(kohya), "unet"), read_any(peft))


def test_peft_text_encoder_to_diffusers_kohya_and_back(tmp_path):
    src = require_real("sd15_textenc_peft_hansjohn")
    a = lorakit.load(src)
    ref = read_any(src)
    diff = api_convert(src, "diffusers", tmp_path / "d.safetensors")
    assert lorakit.load(diff).components() == ["text_encoder"]
    kohya = run_convert(diff, "kohya", tmp_path / "k.safetensors")
    from safetensors import safe_open

    with safe_open(str(kohya), framework="pt") as f:
        assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())  # noqa: SIM118
    peft = api_convert(kohya, "peft", tmp_path / "p")
    b = lorakit.load(peft)
    assert list(b.modules) == list(a.modules)
    assert b.config["auto_mapping"]["base_model_class"] == "CLIPTextModel"
    assert_same_updates(ref, strip_component(read_any(diff), "text_encoder"),
                        strip_component(read_any(kohya), "text_encoder"), read_any(peft))


# ------------------------------------------------------------------------------ LLM adapters


@pytest.mark.parametrize("name", ["gpt2_tigrinya", "smollm135m_medai_5ep", "flan_t5_base_medqna"])
def test_llm_peft_to_kohya_diffusers_and_back(name, tmp_path):
    """PEFT -> kohya -> diffusers -> PEFT keeps module keys (GPT-2's ``transformer.`` is a module
    path, not a diffusion component) and every update."""
    src = require_real(name)
    a = lorakit.load(src)
    ref = read_any(src)
    kohya = run_convert(src, "kohya", tmp_path / "k.safetensors")
    k = lorakit.load(kohya)
    assert k.components() == [] and not k.component_prefix
    assert sorted(k.modules) == sorted(a.modules)  # (file order: kohya names sort differently)
    diff = api_convert(kohya, "diffusers", tmp_path / "d.safetensors")
    d = lorakit.load(diff)
    assert d.components() == [] and not d.component_prefix
    assert list(d.modules) == list(a.modules)
    peft = run_convert(diff, "peft", tmp_path / "p")
    b = lorakit.load(peft)
    assert list(b.modules) == list(a.modules)
    assert b.config["r"] == a.config["r"] and b.config["lora_alpha"] == a.config["lora_alpha"]
    if name.startswith("gpt2"):
        assert all(key.startswith("transformer.h.") for key in b.modules)
    assert_same_updates(ref, read_any(kohya), read_any(diff), read_any(peft))


# ------------------------------------------------------------ every real adapter, every format



@pytest.mark.parametrize("entry", manifest_params())
@pytest.mark.parametrize("to", ["peft", "diffusers", "kohya"])
def test_every_adapter_converts_exactly(entry, to, tmp_path):
    """Each real adapter written in each format reads back (here, without lorakit) to the same
    factors and scales; kohya refuses extras (heads) by name instead of dropping them."""
    src = require_real(entry["name"])
    a = lorakit.load(src)
    ref = read_any(src)
    if to == "kohya" and a.extras:
        with pytest.raises(lorakit.LorakitError, match="extra"):
            api_convert(src, to, tmp_path / "x.safetensors")
        return
    conv = lorakit.convert(a, to)
    out = lorakit.save(conv, tmp_path / ("p" if to == "peft" else "x.safetensors"), to)
    got = read_any(out)
    src_comps, out_comps = a.components(), conv.components()
    if out_comps and not src_comps:  # a PEFT diffusion component gained its prefix (unet., ...)
        got = strip_component(got, out_comps[0])
    elif src_comps and not out_comps:  # written as PEFT: one component, prefix dropped
        got = {f"{src_comps[0]}_{k}": m for k, m in got.items()}
    if entry.get("family") == "flux1" and to == "kohya":  # BFL names, written out by hand
        got = {re.sub(r"^unet_single_blocks_(\d+)_linear2$",
                      r"transformer_single_transformer_blocks_\1_proj_out", k): m
               for k, m in got.items()}
    if a.layout == "peft_adalora":  # the E-fold happened in float32 inside lorakit
        assert_same_updates(ref, got)
    else:
        assert_same_factors(got, ref)
    b = lorakit.load(out)
    assert list(b.extras) == list(a.extras)
    for k, t in a.extras.items():
        assert torch.equal(b.extras[k], t), k
    assert sorted(b.modules) == sorted(conv.modules)


# ---------------------------------------------------------------------- overwrite and --force


def test_convert_refuses_to_overwrite_without_force(tmp_path):
    a_src = require_real("gpt2_r4_jhess")
    b_src = require_real("gpt2_tigrinya")
    out = tmp_path / "lora.safetensors"
    run_convert(a_src, "kohya", out)
    before = out.read_bytes()
    # the installed entry point's one-line error contract, in a real process
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "convert", str(b_src), "--to",
                           "kohya", "-o", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "exists" in lines[0], proc.stderr
    assert "--force" in lines[0]
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temporary left behind
    # CliRunner: the same refusal surfaces as OutputExistsError
    res = CliRunner().invoke(cli, ["convert", str(b_src), "--to", "kohya", "-o", str(out)])
    assert res.exit_code != 0 and isinstance(res.exception, OutputExistsError)
    assert out.read_bytes() == before
    # with --force the output is replaced by the new conversion
    run_convert(b_src, "kohya", out, "--force")
    assert out.read_bytes() != before
    assert_same_factors(read_any(out), read_any(b_src))


def test_convert_peft_folder_refuses_to_overwrite(tmp_path):
    src = require_real("distilbert_notask_vinil")
    out = tmp_path / "peft_out"
    run_convert(require_real("sd15_textenc_peft_hansjohn"), "peft", out)
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", "peft", "-o", str(out)])
    assert isinstance(res.exception, OutputExistsError)
    with pytest.raises(OutputExistsError):
        lorakit.save(lorakit.load(src), out, "peft")
    assert sorted(lorakit.load(out).modules)[0].startswith("text_model.")
    run_convert(src, "peft", out, "--force")
    assert_same_factors(read_any(out), read_any(src))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft_out"]
