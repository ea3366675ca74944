"""diffusers LoRA files on small synthetic adapters, with exact expected values."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import UnknownLayoutError

from ._raw import peft_rule, read_diffusers
from .helpers import randn, read_keys, write_st

BLK = "down_blocks.0.attentions.0.transformer_blocks.0"


def _pair(prefix: str, r: int, din: int, dout: int, seed: int, a="lora_A.weight",
          b="lora_B.weight") -> dict[str, torch.Tensor]:
    return {f"{prefix}.{a}": randn(r, din, seed=seed), f"{prefix}.{b}": randn(dout, r, seed=seed + 1)}


def test_legacy_attention_processor_layout(tmp_path):
    t = {}
    for i, proj in enumerate(["to_q", "to_k", "to_v", "to_out", "add_k_proj"]):
        t.update(_pair(f"{BLK}.attn1.processor.{proj}_lora", 4, 8, 8, 10 * i, "down.weight",
                       "up.weight"))
    a = lorakit.load(write_st(tmp_path / "legacy.safetensors", t))
    assert a.layout == "diffusers_legacy_processor" and a.components() == ["unet"]
    assert sorted(a.modules) == sorted(f"unet.{BLK}.attn1.{p}" for p in
                                       ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"])
    m = a.modules[f"unet.{BLK}.attn1.to_out.0"]
    assert torch.equal(m.down, t[f"{BLK}.attn1.processor.to_out_lora.down.weight"])
    assert m.scale == 1.0  # no alpha anywhere: alpha = r
    out = lorakit.save(a, tmp_path / "cur.safetensors")
    keys, meta = read_keys(out)
    assert f"unet.{BLK}.attn1.to_out.0.lora_A.weight" in keys and len(keys) == 10
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 4
    assert cfg["unet.target_modules"] == ["add_k_proj", "to_k", "to_out.0", "to_q", "to_v"]


def test_lora_down_up_layout_with_text_encoder_and_alpha_tensors(tmp_path):
    t = _pair(f"unet.{BLK}.attn2.to_k.lora", 4, 8, 8, 0, "down.weight", "up.weight")
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    t.update(_pair(f"{te}.lora_linear_layer", 2, 8, 8, 5, "down.weight", "up.weight"))
    t[f"{te}.alpha"] = torch.tensor(1.0)
    a = lorakit.load(write_st(tmp_path / "du.safetensors", t))
    assert a.layout == "diffusers_lora_down_up"
    assert sorted(a.components()) == ["text_encoder", "unet"]
    assert a.modules[te].scale == 0.5 and a.modules[f"unet.{BLK}.attn2.to_k"].scale == 1.0


def test_current_layout_per_component_metadata_round_trip(tmp_path):
    mods = {
        f"unet.{BLK}.attn1.to_q": LoraModule(randn(4, 8), randn(8, 4, seed=1), alpha=4.0),
        f"unet.{BLK}.attn1.to_out.0": LoraModule(randn(4, 8, seed=2), randn(8, 4, seed=3), 2.0),
        f"unet.{BLK}.attn2.to_k": LoraModule(randn(8, 8, seed=4), randn(8, 8, seed=5), 4.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            LoraModule(randn(2, 8, seed=6), randn(8, 2, seed=7), alpha=8.0),
    }
    a = Adapter(modules=mods, component_prefix=True)
    out = lorakit.save(a, tmp_path / "d.safetensors", "diffusers")
    keys, meta = read_keys(out)
    assert f"unet.{BLK}.attn1.to_out.0.lora_B.weight" in keys
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert (cfg["unet.r"], cfg["unet.lora_alpha"]) == (4, 4)
    assert cfg["unet.rank_pattern"] == {f"{BLK}.attn2.to_k": 8}
    assert cfg["unet.alpha_pattern"] == {f"{BLK}.attn1.to_out.0": 2}
    assert (cfg["text_encoder.r"], cfg["text_encoder.lora_alpha"]) == (2, 8)
    assert json.loads(meta["lorakit.components"]) == ["unet", "text_encoder"]
    b = lorakit.load(out)
    assert b.layout == "diffusers" and list(b.modules) == sorted(mods)
    for k, m in mods.items():
        assert (b.modules[k].rank, b.modules[k].alpha) == (m.rank, m.alpha)
        assert torch.equal(b.modules[k].down, m.down) and torch.equal(b.modules[k].up, m.up)
    # the metadata alone (as diffusers/PEFT read it) gives every module's scale
    raw = read_diffusers(out)
    assert {k: v.scale for k, v in raw.items()} == {
        k.replace(".", "_"): m.scale for k, m in mods.items()}
    for k, m in mods.items():
        comp, _, rest = k.partition(".")
        assert peft_rule(cfg[f"{comp}.rank_pattern"], rest, cfg[f"{comp}.r"]) == m.rank


def test_rslora_recorded_in_metadata(tmp_path):
    m = LoraModule(randn(16, 8), randn(8, 16, seed=1), alpha=8.0, rslora=True)
    out = lorakit.save(Adapter(modules={f"unet.{BLK}.attn1.to_q": m}, component_prefix=True),
                       tmp_path / "d.safetensors", "diffusers")
    cfg = json.loads(read_keys(out)[1]["lora_adapter_metadata"])
    assert cfg["unet.use_rslora"] is True
    b = lorakit.load(out).modules[f"unet.{BLK}.attn1.to_q"]
    assert b.rslora and b.scale == 2.0


def test_model_level_file_without_component_prefix(tmp_path):
    """A diffusers save of a bare UNet (``get_peft_model_state_dict(unet)``: no ``unet.``) is
    the family's UNet (issue 16, defect 1), so kohya output says ``lora_unet_``."""
    t = _pair(f"{BLK}.attn1.to_q", 4, 8, 8, 0)
    a = lorakit.load(write_st(tmp_path / "m.safetensors", t))
    assert a.components() == ["unet"] and list(a.modules) == [f"unet.{BLK}.attn1.to_q"]
    assert a.modules[f"unet.{BLK}.attn1.to_q"].scale == 1.0


def test_extras_round_trip_through_diffusers(tmp_path):
    mods = {"transformer.h.0.attn.c_attn": LoraModule(randn(4, 8), randn(12, 4, seed=1), 8.0)}
    head = randn(3, 8, seed=9)
    a = Adapter(modules=mods, extras={"score.weight": head})
    out = lorakit.save(a, tmp_path / "d.safetensors", "diffusers")
    b = lorakit.load(out)
    assert list(b.modules) == list(mods) and b.components() == []
    assert list(b.extras) == ["score.weight"] and torch.equal(b.extras["score.weight"], head)
    # back to PEFT, the head is kept next to the LoRA tensors
    p = lorakit.load(lorakit.save(lorakit.convert(b, "peft"), tmp_path / "p", "peft"))
    assert torch.equal(p.extras["score.weight"], head)


def test_unknown_keys_are_named(tmp_path):
    t = _pair(f"unet.{BLK}.attn1.to_q", 4, 8, 8, 0)
    t["unet.something_else.weight"] = randn(3)
    with pytest.raises(UnknownLayoutError) as e:
        lorakit.load(write_st(tmp_path / "x.safetensors", t))
    assert "unet.something_else.weight" in str(e.value) and "x.safetensors" in str(e.value)
