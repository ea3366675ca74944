"""Two more Flux.1 layouts, built by hand from their published key schemes:

* fal Kontext (``_convert_fal_kontext_lora_to_diffusers``): PEFT keys over the BFL checkpoint,
  ``base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight``, no alphas;
* BFL control LoRA (Flux.1 Canny/Depth dev LoRA, ``_convert_bfl_flux_control_lora_to_diffusers``):
  bare BFL names, ``lora_A``/``lora_B`` with a ``lora_B.bias`` each, no alphas, the full query/key
  norm scales of every block (``double_blocks.0.img_attn.norm.query_norm.scale``) and ``img_in``
  widened to 128 input channels.

Every tensor accounted for: factors, biases and norm scales (kept as known extras, written back
bit for bit, renamed to diffusers' ``attn.norm_q.weight``, refused by name where a layout cannot
hold them). Fused qkv / linear1 splits checked on the full update against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lorakit
from lorakit.cli import cli
from lorakit.errors import ConfigMismatchError, UnknownLayoutError
from lorakit.formats import adapter_family
from lorakit.formats.detect import classify_keys
from lorakit.formats.families import FLUX1
from lorakit.formats.rename import to_naming
from lorakit.lowrank.policy import RankPolicy
from tests.formats.helpers import assert_unknown_key_named, randn, write_st
from tests.formats.test_families import lora_delta, np_delta

H = 16  # tiny hidden width: the proportions (qkv 3 : linear1 1+1+1+4) are Flux.1's
_MODS = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.img_attn.proj": (H, H),
         "double_blocks.0.txt_attn.qkv": (3 * H, H), "double_blocks.0.img_mlp.0": (4 * H, H),
         "double_blocks.0.img_mod.lin": (6 * H, H), "single_blocks.0.linear1": (7 * H, H),
         "single_blocks.0.linear2": (H, 5 * H), "final_layer.linear": (4, H)}
_NORMS = ("double_blocks.0.img_attn.norm.query_norm.scale",
          "double_blocks.0.img_attn.norm.key_norm.scale",
          "double_blocks.0.txt_attn.norm.query_norm.scale",
          "double_blocks.0.txt_attn.norm.key_norm.scale",
          "single_blocks.0.norm.query_norm.scale", "single_blocks.0.norm.key_norm.scale")
_DIFFUSERS_NORMS = ("transformer_blocks.0.attn.norm_q.weight",
                    "transformer_blocks.0.attn.norm_k.weight",
                    "transformer_blocks.0.attn.norm_added_q.weight",
                    "transformer_blocks.0.attn.norm_added_k.weight",
                    "single_transformer_blocks.0.attn.norm_q.weight",
                    "single_transformer_blocks.0.attn.norm_k.weight")


def fal_file(r: int = 2) -> dict[str, torch.Tensor]:
    out = {}
    for n, (name, (o, i)) in enumerate(_MODS.items()):
        out[f"base_model.model.{name}.lora_A.weight"] = randn(r, i, seed=10 * n)
        out[f"base_model.model.{name}.lora_B.weight"] = randn(o, r, seed=10 * n + 1)
    return out


def control_file(r: int = 2) -> dict[str, torch.Tensor]:
    mods = {**_MODS, "img_in": (H, 2 * 4), "final_layer.adaLN_modulation.1": (2 * H, H)}
    out = {}
    for n, (name, (o, i)) in enumerate(mods.items()):
        out[f"{name}.lora_A.weight"] = randn(r, i, seed=10 * n)
        out[f"{name}.lora_B.weight"] = randn(o, r, seed=10 * n + 1)
        out[f"{name}.lora_B.bias"] = randn(o, seed=10 * n + 2)
    for n, name in enumerate(_NORMS):
        out[name] = randn(8, seed=500 + n)  # head_dim 8: one scale per head channel
    return out


def _same_file(path, want: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    got = load_file(str(path))
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


# ------------------------------------------------------------------ fal Kontext

def test_fal_kontext_reads_bfl_names_at_scale_one(tmp_path):
    t = fal_file()
    assert classify_keys(list(t), "f") == ("falkontext", "falkontext")
    a = lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert a.layout == "falkontext" and adapter_family(a) is FLUX1
    assert sorted(a.modules) == sorted(f"transformer.{k}" for k in _MODS)
    assert set(a.scales().values()) == {1.0}  # no alphas: alpha = r
    for name in _MODS:
        m = a.modules[f"transformer.{name}"]
        assert torch.equal(m.down, t[f"base_model.model.{name}.lora_A.weight"])


def test_fal_kontext_round_trip_bit_for_bit(tmp_path):
    t = fal_file()
    a = lorakit.load(write_st(tmp_path / "f.safetensors", t))
    _same_file(lorakit.save(a, tmp_path / "o.safetensors", "falkontext"), t)
    d = lorakit.save(lorakit.convert(a, "diffusers"), tmp_path / "d.safetensors", "diffusers")
    _same_file(lorakit.save(lorakit.load(d), tmp_path / "o2.safetensors", "fal-kontext"), t)


def test_fal_kontext_linear1_splits_exactly_and_scales_fold(tmp_path):
    t = fal_file()
    a = lorakit.load(write_st(tmp_path / "f.safetensors", t))
    d = to_naming(a, FLUX1, "diffusers")
    a1, b1 = (t[f"base_model.model.single_blocks.0.linear1.lora_{s}.weight"] for s in "AB")
    rows = {"attn.to_q": (0, H), "attn.to_k": (H, 2 * H), "attn.to_v": (2 * H, 3 * H),
            "proj_mlp": (3 * H, 7 * H)}
    for sub, (lo, hi) in rows.items():
        got = lora_delta(d.modules[f"transformer.single_transformer_blocks.0.{sub}"])
        np.testing.assert_allclose(got, np_delta(b1[lo:hi], a1, 1.0), rtol=1e-6, atol=1e-6)
    scaled = a.copy(modules={k: m.with_factors(m.down, m.up, alpha=3.0)
                             for k, m in a.modules.items()})  # scale 1.5, folded into B
    back = lorakit.load(lorakit.save(scaled, tmp_path / "s.safetensors", "falkontext"))
    for k, m in scaled.modules.items():
        assert back.modules[k].scale == 1.0
        np.testing.assert_allclose(lora_delta(back.modules[k]), lora_delta(m), rtol=1e-5,
                                   atol=1e-5)  # B * 1.5 stored in float32


def test_fal_kontext_unknown_key_and_module(tmp_path):
    t = fal_file()
    clean = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert_unknown_key_named(tmp_path, t, "base_model.model.double_blocks.0.img_attn.qkv.lora_C"
                             ".weight", clean)
    far = {**t, "base_model.model.double_blocks.19.img_attn.proj.lora_A.weight": randn(2, H),
           "base_model.model.double_blocks.19.img_attn.proj.lora_B.weight": randn(H, 2)}
    with pytest.raises(UnknownLayoutError, match="Flux.1 does not have"):
        lorakit.load(write_st(tmp_path / "far.safetensors", far))


def test_bare_peft_weights_of_other_models_still_need_their_config(tmp_path):
    t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": randn(2, 8),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": randn(8, 2)}
    with pytest.raises(ConfigMismatchError, match="adapter_config.json"):
        lorakit.load(write_st(tmp_path / "p.safetensors", t))


# ------------------------------------------------------------------ BFL control LoRA

def test_control_lora_every_tensor_accounted_for(tmp_path):
    t = control_file()
    assert classify_keys(list(t), "c") == ("bflcontrol", "bflcontrol")
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.layout == "bflcontrol" and adapter_family(a) is FLUX1
    assert sorted(a.extras) == sorted(f"transformer.{k}" for k in _NORMS)
    for k in _NORMS:
        assert torch.equal(a.extras[f"transformer.{k}"], t[k])
    for k, m in a.modules.items():
        name = k[len("transformer."):]
        assert torch.equal(m.bias, t[f"{name}.lora_B.bias"]) and m.scale == 1.0, k
    n_tensors = 3 * len(a.modules) + len(a.extras)
    assert n_tensors == len(t)  # factors, biases and norm scales: nothing else, nothing dropped
    assert a.modules["transformer.img_in"].in_features == 8


def test_control_lora_round_trips_bit_for_bit_also_through_diffusers(tmp_path):
    t = control_file()
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    _same_file(lorakit.save(a, tmp_path / "o.safetensors", "bflcontrol"), t)
    d = lorakit.save(a, tmp_path / "d.safetensors", "diffusers")
    dd = lorakit.load(d)
    assert sorted(dd.extras) == sorted(f"transformer.{k}" for k in _DIFFUSERS_NORMS)
    _same_file(lorakit.save(dd, tmp_path / "o2.safetensors", "bfl-control"), t)
    small, _ = lorakit.resize(a, RankPolicy.from_options(rank=1))  # extras and biases kept
    out = lorakit.load(lorakit.save(small, tmp_path / "r.safetensors", "bflcontrol"))
    assert all(torch.equal(out.extras[k], a.extras[k]) for k in a.extras)
    assert all(torch.equal(out.modules[k].bias, m.bias) for k, m in a.modules.items())


def test_control_lora_splits_exactly_with_biases_and_swap(tmp_path):
    t = control_file()
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    d = to_naming(a, FLUX1, "diffusers")
    a1, b1 = (t[f"double_blocks.0.img_attn.qkv.lora_{s}.weight"] for s in "AB")
    bias = t["double_blocks.0.img_attn.qkv.lora_B.bias"]
    for j, sub in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        m = d.modules[f"transformer.transformer_blocks.0.{sub}"]
        np.testing.assert_allclose(lora_delta(m), np_delta(b1[j * H:(j + 1) * H], a1, 1.0),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(m.bias, bias[j * H:(j + 1) * H])
    af, bf = (t[f"final_layer.adaLN_modulation.1.lora_{s}.weight"] for s in "AB")
    m = d.modules["transformer.norm_out.linear"]  # (shift, scale) -> diffusers' (scale, shift)
    swapped = torch.cat([bf[H:], bf[:H]])
    np.testing.assert_allclose(lora_delta(m), np_delta(swapped, af, 1.0), rtol=1e-6, atol=1e-6)
    fb = t["final_layer.adaLN_modulation.1.lora_B.bias"]
    assert torch.equal(m.bias, torch.cat([fb[H:], fb[:H]]))
    for native, plain in zip(_NORMS, _DIFFUSERS_NORMS, strict=True):
        assert torch.equal(d.extras[f"transformer.{plain}"], t[native])


@pytest.mark.parametrize("layout", ["kohya", "bfl", "falkontext"])
def test_control_lora_refused_by_name_where_it_cannot_be_held(layout, tmp_path):
    """The norm scales are named (the first three and their count), not dropped."""
    a = lorakit.load(write_st(tmp_path / "c.safetensors", control_file()))
    with pytest.raises(ConfigMismatchError) as info:
        lorakit.save(a, tmp_path / f"{layout}.safetensors", layout)
    text = str(info.value)
    assert "extra (non-LoRA) tensors" in text and "norm.key_norm.scale" in text and \
        "(6 in all)" in text, text
    no_norms = a.copy(extras={})  # then the lora_B biases are what the layout cannot hold
    with pytest.raises(ConfigMismatchError, match="lora_B bias"):
        lorakit.save(no_norms, tmp_path / f"{layout}2.safetensors", layout)


def test_bflcontrol_needs_a_control_lora(tmp_path):
    plain = lorakit.load(write_st(tmp_path / "f.safetensors", fal_file()))
    with pytest.raises(ConfigMismatchError, match="no control LoRA"):
        lorakit.save(plain, tmp_path / "c.safetensors", "bflcontrol")


def test_control_lora_inspect_says_what_it_holds(tmp_path):
    t = control_file()
    t["img_in.lora_A.weight"] = randn(2, 128, seed=3)  # Flux.1 Canny/Depth: 128 channels
    t["img_in.lora_B.weight"] = randn(3072, 2, seed=4)
    t["img_in.lora_B.bias"] = randn(3072, seed=5)
    path = write_st(tmp_path / "c.safetensors", t)
    res = CliRunner().invoke(cli, ["inspect", str(path), "--no-spectra", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["layout"] == "bflcontrol" and len(info["extra_tensors"]) == 6
    notes = " | ".join(info["notes"])
    assert "6 norm scales" in notes and f"{len(info['modules'])} modules with a lora_B bias" \
        in notes and "x_embedder takes 128 input channels, Flux.1 64" in notes


def test_control_lora_unknown_key_and_module(tmp_path):
    t = control_file()
    clean = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert_unknown_key_named(tmp_path, t, "double_blocks.0.img_attn.norm.value_norm.scale", clean)
    far = {**t, "single_blocks.38.linear2.lora_A.weight": randn(2, 5 * H),
           "single_blocks.38.linear2.lora_B.weight": randn(H, 2)}
    with pytest.raises(UnknownLayoutError, match="Flux.1 does not have"):
        lorakit.load(write_st(tmp_path / "far.safetensors", far))


def test_control_lora_through_a_peft_folder_bit_for_bit(tmp_path):
    """PEFT (one model, diffusers names: ``attn.norm_q.weight`` extras) and back to bflcontrol."""
    t = control_file()
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    pe = lorakit.convert(a, "peft", component="transformer")
    assert "transformer_blocks.0.attn.norm_added_k.weight" in pe.extras
    folder = lorakit.save(pe, tmp_path / "peft", "peft")
    back = lorakit.convert(lorakit.load(folder), "bflcontrol")
    _same_file(lorakit.save(back, tmp_path / "o.safetensors", "bflcontrol"), t)


def test_convert_cli_refuses_or_drops_and_lists_the_norm_scales(tmp_path):
    """``convert --to kohya`` of a control LoRA without its biases: an error naming the norm
    scales; with ``--ignore-unknown`` they are dropped and listed, and the LoRA pairs written."""
    t = {k: v for k, v in control_file().items() if not k.endswith(".bias")}
    src = write_st(tmp_path / "c.safetensors", t)
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o",
                                   str(tmp_path / "k.safetensors")])
    text = res.output + str(res.exception)
    assert res.exit_code != 0 and "norm.key_norm.scale" in text and "--ignore-unknown" in text
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o",
                                   str(tmp_path / "k.safetensors"), "--ignore-unknown"])
    assert res.exit_code == 0, res.output
    assert "dropped 6 extra tensor(s) the kohya layout cannot hold" in res.output
    k = lorakit.load(tmp_path / "k.safetensors")
    assert not k.extras and len(k.modules) == 10
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", "bfl-control", "-o",
                                   str(tmp_path / "c2.safetensors")])
    assert res.exit_code == 0, res.output
    _same_file(tmp_path / "c2.safetensors", t)
