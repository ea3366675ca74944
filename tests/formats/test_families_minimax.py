"""MiniMax-H3 (diffusers ``MiniMaxH3Transformer3DModel``): spec-exact files of each producer's
scheme built by hand (ai-toolkit ``diffusion_model.`` + ``lora_A``/``lora_B``; the reference /
ComfyUI's prefix-less names; musubi-tuner's ``lora_unet_blocks_0_attn_qkv_proj`` + ``.alpha``;
DiffSynth-Studio's ``.lora_A.default.weight`` with its per-head interleaved qkv) and diffusers
files; fused qkv split and fused exactly, ``mlp.fc1``'s halves swapped, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import ShapeMismatchError, UnknownLayoutError
from lorakit.formats import adapter_family
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import MINIMAX_H3, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import (
    assert_unknown_key_named,
    kohya_pair,
    randn,
    read_keys,
    write_st,
)
from tests.formats.test_families import lora_delta, np_delta

H, INNER, FF = 24, 32, 40  # residual 24; attention 32 wide (wider, as the real one); SwiGLU 40


def ab(stem, r, din, dout, seed, mid=""):
    return {f"{stem}.lora_A{mid}.weight": randn(r, din, seed=seed),
            f"{stem}.lora_B{mid}.weight": randn(dout, r, seed=seed + 1)}


def test_aitoolkit_qkv_splits_fc1_swaps_and_names_map(tmp_path):
    p = "diffusion_model."
    t = {**ab(f"{p}blocks.49.attn.qkv_proj", 4, H, 3 * INNER, 1),
         **ab(f"{p}blocks.0.mlp.fc1", 2, H, 2 * FF, 3),
         **ab(f"{p}token_refiner.blocks.1.attn.out_proj", 2, INNER, H, 5),
         **ab(f"{p}token_refiner.blocks.0.mlp.fc1", 2, H, 2 * FF, 7),
         **ab(f"{p}blocks.0.adaln_proj.linear", 2, 12, 6 * 3 * H, 9),
         **ab(f"{p}final_layer.adaln_proj.linear", 2, 12, 2 * H, 11),
         **ab(f"{p}video_patch_proj", 2, 16, H, 13),
         **ab(f"{p}time_embedder.proj_out", 2, 28, 12, 15)}
    a = lorakit.load(write_st(tmp_path / "a.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is MINIMAX_H3
    d = to_naming(a, MINIMAX_H3, "diffusers").modules
    k = f"{p}blocks.49.attn.qkv_proj"
    up, down = t[f"{k}.lora_B.weight"], t[f"{k}.lora_A.weight"]
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        np.testing.assert_allclose(lora_delta(d[f"transformer.transformer_blocks.49.attn.{name}"]),
                                   np_delta(up[j * INNER:(j + 1) * INNER], down, 1.0), rtol=1e-12)
    for native, ours in (("blocks.0.mlp.fc1", "transformer_blocks.0.ff.net.0.proj"),
                         ("token_refiner.blocks.0.mlp.fc1",
                          "token_refiner.refiner_blocks.0.ff.net.0.proj")):
        up, down = t[f"{p}{native}.lora_B.weight"], t[f"{p}{native}.lora_A.weight"]
        gate, value = up[:FF], up[FF:]  # [gate; value] -> diffusers' [value; gate]
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]),
                                   np_delta(torch.cat([value, gate]), down, 1.0), rtol=1e-12)
    same = {"token_refiner.blocks.1.attn.out_proj": "token_refiner.refiner_blocks.1.attn.to_out.0",
            "blocks.0.adaln_proj.linear": "transformer_blocks.0.adaln_proj.linear",
            "final_layer.adaln_proj.linear": "norm_out.linear",  # (shift, scale) in both
            "video_patch_proj": "proj_in", "time_embedder.proj_out": "time_embedder.linear_2"}
    for native, ours in same.items():
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{p}{native}.lora_B.weight"], t[f"{p}{native}.lora_A.weight"], 1.0), rtol=1e-12)
    assert coverage_line(coverage(a, MINIMAX_H3)) == \
        "blocks 2/50 (5 layer kinds), token refiner blocks 2/2 (attn.to_out.0, ff.net.0.proj " \
        "only), reference transformer none"
    out = lorakit.save(to_naming(a, MINIMAX_H3, "diffusers"), tmp_path / "a2.safetensors", "bfl")
    keys, meta = read_keys(out)
    assert keys == set(t) and meta["lorakit.family"] == "minimaxh3"
    back = lorakit.load(out).modules["transformer.blocks.0.mlp.fc1"]
    assert torch.equal(back.up, t[f"{p}blocks.0.mlp.fc1.lora_B.weight"])  # swapped back exactly


def test_reference_files_without_prefix_read_the_same(tmp_path):
    t = {**ab("blocks.2.attn.qkv_proj", 2, H, 3 * INNER, 1), **ab("condition_proj", 2, 20, H, 3)}
    a = lorakit.load(write_st(tmp_path / "r.safetensors", t))
    assert adapter_family(a) is MINIMAX_H3
    assert sorted(to_naming(a, MINIMAX_H3, "diffusers").modules) == [
        "transformer.context_embedder", "transformer.transformer_blocks.2.attn.to_k",
        "transformer.transformer_blocks.2.attn.to_q", "transformer.transformer_blocks.2.attn.to_v"]


def test_musubi_kohya_names_and_alphas(tmp_path):
    t = {**kohya_pair("lora_unet_blocks_0_attn_qkv_proj", 4, H, 3 * INNER, 1, alpha=2.0),
         **kohya_pair("lora_unet_token_refiner_blocks_1_mlp_fc2", 2, FF, H, 3, alpha=1.0),
         **kohya_pair("lora_unet_final_layer_audio_out", 2, H, 6, 5),
         **kohya_pair("lora_unet_time_embedder_proj_in", 2, 16, 28, 7, alpha=4.0)}
    a = lorakit.load(write_st(tmp_path / "k.safetensors", t))
    assert a.source_format == "kohya" and adapter_family(a) is MINIMAX_H3
    assert sorted(a.modules) == ["transformer.blocks.0.attn.qkv_proj",
                                 "transformer.final_layer.audio_out",
                                 "transformer.time_embedder.proj_in",
                                 "transformer.token_refiner.blocks.1.mlp.fc2"]
    d = to_naming(a, MINIMAX_H3, "diffusers").modules
    k = "lora_unet_blocks_0_attn_qkv_proj"
    np.testing.assert_allclose(
        lora_delta(d["transformer.transformer_blocks.0.attn.to_v"]),
        np_delta(t[f"{k}.lora_up.weight"][2 * INNER:], t[f"{k}.lora_down.weight"], 0.5),
        rtol=1e-12)
    assert d["transformer.audio_proj_out"].scale == 1.0  # no alpha: alpha = r
    out = lorakit.save(d_adapter := to_naming(a, MINIMAX_H3, "diffusers"),
                       tmp_path / "k2.safetensors", "kohya")
    assert read_keys(out)[0] == set(t) | {"lora_unet_final_layer_audio_out.alpha"}
    assert d_adapter is not a


def test_diffsynth_interleaved_qkv_is_reordered_per_head(tmp_path):
    heads, hd = 2, 128
    rows = 3 * heads * hd
    t = {**ab("blocks.0.attn.qkv_proj", 2, H, rows, 1, ".default"),
         **ab("blocks.0.mlp.fc2", 2, FF, H, 3, ".default")}
    a = lorakit.load(write_st(tmp_path / "s.safetensors", t))
    assert a.layout == "diffsynth" and adapter_family(a) is MINIMAX_H3
    up = t["blocks.0.attn.qkv_proj.lora_B.default.weight"].reshape(heads, 3, hd, 2)
    d = to_naming(a, MINIMAX_H3, "diffusers").modules
    down = t["blocks.0.attn.qkv_proj.lora_A.default.weight"]
    for j, name in enumerate(("to_q", "to_k", "to_v")):  # head h's q rows: h*384 + [0, 128)
        want = up[:, j].reshape(heads * hd, 2)
        np.testing.assert_allclose(lora_delta(d[f"transformer.transformer_blocks.0.attn.{name}"]),
                                   np_delta(want, down, 1.0), rtol=1e-12)
    bad = ab("blocks.0.attn.qkv_proj", 2, H, 3 * 64, 1, ".default")
    with pytest.raises(ShapeMismatchError, match="3 x 128") as info:
        lorakit.load(write_st(tmp_path / "b.safetensors", bad))
    assert info.value.key == "blocks.0.attn.qkv_proj.lora_B.default.weight"


def test_split_loras_fuse_into_qkv_proj_and_fc1(tmp_path):
    mods, ref = {}, []
    for j, (name, r, alpha) in enumerate([("to_q", 2, 4.0), ("to_k", 3, 3.0), ("to_v", 4, 1.0)]):
        m = LoraModule(randn(r, H, seed=10 + j), randn(INNER, r, seed=20 + j), alpha=alpha)
        mods[f"transformer.transformer_blocks.3.attn.{name}"] = m
        ref.append(np_delta(m.up, m.down, alpha / r))
    ff = LoraModule(randn(2, H, seed=30), randn(2 * FF, 2, seed=31), alpha=2.0)
    mods["transformer.transformer_blocks.3.ff.net.0.proj"] = ff
    mods["transformer.transformer_blocks.3.adaln_proj.linear"] = LoraModule(
        randn(2, 12, seed=32), randn(18 * H, 2, seed=33), alpha=2.0)
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is MINIMAX_H3
    out = lorakit.load(lorakit.save(src, tmp_path / "c.safetensors", "kohya"))
    fused = out.modules["transformer.blocks.3.attn.qkv_proj"]
    assert fused.rank == 9
    np.testing.assert_allclose(lora_delta(fused), np.vstack(ref), rtol=1e-6, atol=1e-6)
    value, gate = ff.up[:FF], ff.up[FF:]
    np.testing.assert_allclose(lora_delta(out.modules["transformer.blocks.3.mlp.fc1"]),
                               np_delta(torch.cat([gate, value]), ff.down, 1.0), rtol=1e-6)


def test_detection():
    assert detect_family(["transformer.transformer_blocks.0.adaln_proj.linear"]) is MINIMAX_H3
    assert detect_family(["transformer.token_refiner.refiner_blocks.0.attn.to_q"]) is MINIMAX_H3
    assert detect_family(["blocks.0.attn.qkv_proj"], component_prefix=False) is MINIMAX_H3
    assert detect_family(["transformer.final_layer.video_out"]) is MINIMAX_H3
    assert detect_family(["transformer.blocks.0.self_attn.q"]).name == "wan"
    # diffusers attention names alone are Flux.1's / SD3's too: undecided without a hint
    assert detect_family(["transformer.transformer_blocks.0.attn.to_q"]) is None
    assert detect_family(["transformer.transformer_blocks.0.attn.to_q"],
                         {"lorakit.family": "minimaxh3"}) is MINIMAX_H3


LAYOUT_FILES = {
    "bfl": (ab("diffusion_model.blocks.0.mlp.fc2", 2, FF, H, 1),
            "diffusion_model.blocks.0.mlp.fc2.lora_M.weight"),
    "kohya": (kohya_pair("lora_unet_blocks_0_mlp_fc2", 2, FF, H, 1, alpha=2.0),
              "lora_unet_blocks_0_mlp_fc2.lora_mystery.weight"),
    "diffusers": (ab("transformer.transformer_blocks.0.adaln_proj.linear", 2, 12, 18 * H, 1),
                  "transformer.transformer_blocks.0.adaln_proj.linear.lora_Z.weight"),
    "diffsynth": (ab("blocks.0.mlp.fc2", 2, FF, H, 1, ".default"),
                  "blocks.0.mlp.fc2.lora_Z.default.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is MINIMAX_H3
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.token_refiner.refiner_blocks.0.adaln_proj.linear",  # the refiner has no AdaLN
    "transformer.transformer_blocks.50.attn.to_q",  # block 50 of 0..49
    "transformer.token_refiner.blocks.2.attn.qkv_proj",  # refiner block 2 of 0..1
])
def test_module_minimax_does_not_have(key, tmp_path):
    t = {**ab("transformer.transformer_blocks.0.adaln_proj.linear", 2, 2, 2, 1),
         **ab(key, 2, 2, 6, 3)}
    with pytest.raises(UnknownLayoutError, match="MiniMax-H3 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key


def test_transformer_ref_is_a_component_kohya_and_comfyui_cannot_spell(tmp_path):
    from lorakit.errors import ConfigMismatchError

    t = ab("transformer_ref.transformer_blocks.0.adaln_proj.linear", 2, 12, 18 * H, 1)
    a = lorakit.load(write_st(tmp_path / "ref.safetensors", t))
    assert adapter_family(a) is MINIMAX_H3 and a.components() == ["transformer_ref"]
    assert coverage_line(coverage(a, MINIMAX_H3)) == "transformer none, " \
        "reference transformer: blocks 1/50 (adaln_proj.linear only), token refiner blocks 0/2"
    for layout in ("kohya", "bfl"):
        with pytest.raises(ConfigMismatchError, match="transformer_ref"):
            lorakit.save(a, tmp_path / f"{layout}.safetensors", layout)
