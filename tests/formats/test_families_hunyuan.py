"""HunyuanVideo (issue 16, further families): spec-exact files in each layout, built by hand from
the published key schemes (musubi-tuner kohya ``lora_unet_double_blocks_0_img_attn_qkv``,
ComfyUI / original ``diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight``, diffusers
``transformer.transformer_blocks.0.attn.to_q``), checked against numpy on ``scale * B @ A``;
detection against Flux.1, coverage, unknown keys and modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.cli import cli
from lorakit.errors import UnknownLayoutError
from lorakit.formats import adapter_family
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import FLUX1, HUNYUAN_VIDEO
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import H, kohya, lora_delta, np_delta


def comfy(stem, r, din, dout, seed):
    """``diffusion_model.<original name>.lora_A/lora_B.weight`` (no alpha: scale 1)."""
    return {f"diffusion_model.{stem}.lora_A.weight": randn(r, din, seed=seed),
            f"diffusion_model.{stem}.lora_B.weight": randn(dout, r, seed=seed + 1)}


def test_musubi_kohya_file_splits_qkv_and_linear1_exactly(tmp_path):
    """musubi-tuner: ``img_attn_qkv`` -> to_q/k/v, ``linear1`` -> q, k, v, proj_mlp (1:1:1:4),
    sharing A; blocks 19 (double) and 39 (single) exist here, not in Flux.1."""
    t = {**kohya("lora_unet_double_blocks_19_img_attn_qkv", 4, H, 3 * H, 1, alpha=2),
         **kohya("lora_unet_double_blocks_0_txt_attn_qkv", 2, H, 3 * H, 3, alpha=4),
         **kohya("lora_unet_double_blocks_0_img_mlp_fc1", 2, H, 4 * H, 5, alpha=2),
         **kohya("lora_unet_single_blocks_39_linear1", 4, H, 7 * H, 7, alpha=8)}
    a = lorakit.load(write_st(tmp_path / "k.safetensors", t))
    assert adapter_family(a) is HUNYUAN_VIDEO and a.source_format == "kohya"
    d = to_naming(a, HUNYUAN_VIDEO, "diffusers")
    stem = "lora_unet_double_blocks_19_img_attn_qkv"
    up, down = t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"]
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        m = d.modules[f"transformer.transformer_blocks.19.attn.{name}"]
        np.testing.assert_allclose(lora_delta(m), np_delta(up[j * H:(j + 1) * H], down, 0.5),
                                   rtol=1e-12)
    stem = "lora_unet_double_blocks_0_txt_attn_qkv"
    m = d.modules["transformer.transformer_blocks.0.attn.add_v_proj"]
    np.testing.assert_allclose(lora_delta(m), np_delta(t[f"{stem}.lora_up.weight"][2 * H:],
                                                       t[f"{stem}.lora_down.weight"], 2.0),
                               rtol=1e-12)
    assert "transformer.transformer_blocks.0.ff.net.0.proj" in d.modules
    stem = "lora_unet_single_blocks_39_linear1"
    up1, down1 = t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"]
    rows = {"attn.to_q": (0, H), "attn.to_k": (H, 2 * H), "attn.to_v": (2 * H, 3 * H),
            "proj_mlp": (3 * H, 7 * H)}
    for name, (lo, hi) in rows.items():
        m = d.modules[f"transformer.single_transformer_blocks.39.{name}"]
        np.testing.assert_allclose(lora_delta(m), np_delta(up1[lo:hi], down1, 2.0), rtol=1e-12)
    assert coverage_line(coverage(a, HUNYUAN_VIDEO)) == \
        "double blocks 2/20 (7 layer kinds), single blocks 1/40 (4 layer kinds)"
    keys, meta = read_keys(lorakit.save(d, tmp_path / "k2.safetensors", "kohya"))
    assert keys == set(t)  # the very names, rank 4 stacked B (not a block diagonal)
    assert meta["lorakit.family"] == "hunyuanvideo" and meta["ss_base_model_version"] == \
        "hunyuan_video"
    back = lorakit.load(tmp_path / "k2.safetensors").modules["transformer.single_blocks.39.linear1"]
    assert back.rank == 4 and torch.equal(back.up, up1) and torch.equal(back.down, down1)


def test_three_split_loras_fuse_into_img_attn_qkv_block_diagonal(tmp_path):
    """diffusers to_q/to_k/to_v (ranks 2, 3, 4, alphas differ) -> musubi ``img_attn_qkv`` of
    rank 9 whose update is the stacked updates, exactly."""
    mods, ref = {}, []
    for j, (name, r, alpha) in enumerate([("to_q", 2, 4.0), ("to_k", 3, 3.0), ("to_v", 4, 1.0)]):
        m = LoraModule(randn(r, H, seed=10 + j), randn(H, r, seed=20 + j), alpha=alpha)
        mods[f"transformer.transformer_blocks.0.attn.{name}"] = m
        ref.append(np_delta(m.up, m.down, alpha / r))
    src = Adapter(modules=mods, component_prefix=True)
    out = lorakit.save(src, tmp_path / "k.safetensors", "kohya", family="hunyuanvideo")
    fused = lorakit.load(out).modules["transformer.double_blocks.0.img_attn_qkv"]
    assert fused.rank == 9
    np.testing.assert_allclose(lora_delta(fused), np.vstack(ref), rtol=1e-6, atol=1e-6)


def test_comfyui_file_refiner_top_level_and_final_layer_swap(tmp_path):
    """Original names under ``diffusion_model.``: the token refiner's fused ``self_attn_qkv``,
    ``txt_in.*`` / ``time_in`` / ``vector_in`` embedders, and ``final_layer.adaLN_modulation.1``
    = diffusers' ``norm_out.linear`` with shift and scale swapped."""
    ref = "txt_in.individual_token_refiner.blocks.1"
    t = {**comfy(f"{ref}.self_attn_qkv", 2, H, 3 * H, 1), **comfy(f"{ref}.mlp.fc2", 2, 4 * H, H, 3),
         **comfy(f"{ref}.adaLN_modulation.1", 2, H, 2 * H, 5),
         **comfy("txt_in.input_embedder", 2, 16, H, 7), **comfy("txt_in.c_embedder.linear_1", 2,
                                                               16, H, 9),
         **comfy("time_in.mlp.0", 2, 256, H, 11), **comfy("vector_in.in_layer", 2, 8, H, 13),
         **comfy("final_layer.adaLN_modulation.1", 2, H, 2 * H, 15),
         **comfy("double_blocks.0.img_mod.linear", 2, H, 6 * H, 17)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is HUNYUAN_VIDEO
    d = to_naming(a, HUNYUAN_VIDEO, "diffusers").modules
    want = {"context_embedder.token_refiner.refiner_blocks.1.ff.net.2": f"{ref}.mlp.fc2",
            "context_embedder.token_refiner.refiner_blocks.1.norm_out.linear":
            f"{ref}.adaLN_modulation.1",  # gates, no swap
            "context_embedder.proj_in": "txt_in.input_embedder",
            "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "transformer_blocks.0.norm1.linear": "double_blocks.0.img_mod.linear"}
    for ours, native in want.items():
        p = f"diffusion_model.{native}"
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{p}.lora_B.weight"], t[f"{p}.lora_A.weight"], 1.0), rtol=1e-12)
    p = f"diffusion_model.{ref}.self_attn_qkv"
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        m = d[f"transformer.context_embedder.token_refiner.refiner_blocks.1.attn.{name}"]
        np.testing.assert_allclose(lora_delta(m), np_delta(
            t[f"{p}.lora_B.weight"][j * H:(j + 1) * H], t[f"{p}.lora_A.weight"], 1.0), rtol=1e-12)
    p = "diffusion_model.final_layer.adaLN_modulation.1"
    up = t[f"{p}.lora_B.weight"]
    np.testing.assert_allclose(lora_delta(d["transformer.norm_out.linear"]), np_delta(
        torch.cat([up[H:], up[:H]]), t[f"{p}.lora_A.weight"], 1.0), rtol=1e-12)
    keys, _ = read_keys(lorakit.save(a, tmp_path / "c2.safetensors", "bfl"))
    assert keys == set(t)  # ComfyUI spelling: lora_A/lora_B, no alphas


def test_diffusers_names_shared_with_flux_need_a_hint(tmp_path):
    """diffusers spells HunyuanVideo's blocks as Flux.1's: such a file is Flux.1 unless its
    metadata (``lorakit.family``, ``modelspec.architecture``) or ``--family`` says HunyuanVideo;
    a name only HunyuanVideo has decides by itself."""
    t = {f"transformer.single_transformer_blocks.0.attn.to_q.lora_{s}.weight": randn(2, H)
         if s == "A" else randn(H, 2) for s in "AB"}
    assert adapter_family(lorakit.load(write_st(tmp_path / "a.safetensors", t))) is FLUX1
    for meta in ({"lorakit.family": "hunyuanvideo"},
                 {"modelspec.architecture": "hunyuan-video/lora"}):
        a = lorakit.load(write_st(tmp_path / "b.safetensors", t, meta))
        assert adapter_family(a) is HUNYUAN_VIDEO, meta
    a = lorakit.load(tmp_path / "a.safetensors", family="hunyuanvideo")
    assert a.metadata["lorakit.family"] == "hunyuanvideo"
    t.update({f"transformer.context_embedder.proj_in.lora_{s}.weight": randn(2, H)
              if s == "A" else randn(H, 2) for s in "AB"})
    assert adapter_family(lorakit.load(write_st(tmp_path / "c.safetensors", t))) is HUNYUAN_VIDEO


def test_inspect_prints_hunyuan_coverage(tmp_path):
    t = {}
    for i in range(20):
        t.update(kohya(f"lora_unet_double_blocks_{i}_img_mlp_fc1", 2, H, 4 * H, i))
    path = write_st(tmp_path / "k.safetensors", t)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "hunyuanvideo"
    assert info["coverage_line"] == "double blocks 20/20 (ff.net.0.proj only), single blocks 0/40"


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "kohya": (kohya("lora_unet_double_blocks_0_img_mlp_fc1", 2, 2, 8, 1),
              "lora_unet_double_blocks_0_img_mlp_fc1.scale_weight"),
    "bfl": (comfy("double_blocks.0.img_attn_qkv", 2, 2, 6, 1),
            "diffusion_model.double_blocks.0.img_attn_qkv.lora_M.weight"),
    "diffusers": ({f"transformer.context_embedder.proj_in.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, "transformer.context_embedder.proj_in.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is HUNYUAN_VIDEO
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.double_blocks.20.img_attn_proj",  # double block 20 of 0..19
    "transformer.single_blocks.40.linear2",  # single block 40 of 0..39
    "transformer.double_blocks.0.img_attn_zz",  # a layer HunyuanVideo does not have
])
def test_module_hunyuan_video_does_not_have(key, tmp_path):
    t = {**comfy("double_blocks.0.img_mlp.fc1", 2, 2, 8, 1),
         **{f"diffusion_model.{key[len('transformer.'):]}.lora_{s}.weight": randn(2, 2)
            for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="HunyuanVideo does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key
