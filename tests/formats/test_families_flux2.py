"""Flux.2 (diffusers ``Flux2Transformer2DModel``): spec-exact files in each layout, built by hand
from the published key schemes (kohya ``lora_unet_double_blocks_0_img_attn_qkv`` as diffusers'
``_convert_kohya_flux2_lora_to_diffusers`` reads it, ComfyUI / BFL
``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, diffusers
``transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj``), checked against numpy on
``scale * B @ A``; detection against Flux.1 and HunyuanVideo, coverage, unknown keys and
modules."""

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
from lorakit.formats.families import FLUX1, FLUX2, HUNYUAN_VIDEO
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import H, kohya, lora_delta, np_delta

# Flux.2's real proportions at hidden H: SwiGLU feed-forward of 3H (linear_in 2 x 3H rows),
# single-block linear1 = q, k, v + 2 x 3H rows, linear2 input H + 3H
FF_IN, LINEAR1, LINEAR2_IN = 6 * H, 9 * H, 4 * H


def comfy(stem, r, din, dout, seed):
    """``diffusion_model.<BFL name>.lora_A/lora_B.weight`` (no alpha: scale 1)."""
    return {f"diffusion_model.{stem}.lora_A.weight": randn(r, din, seed=seed),
            f"diffusion_model.{stem}.lora_B.weight": randn(dout, r, seed=seed + 1)}


def test_kohya_file_splits_qkv_exactly_and_keeps_linear1_fused(tmp_path):
    """kohya: ``img_attn_qkv`` -> to_q/k/v sharing A, B's row blocks; ``linear1`` is diffusers'
    one fused ``attn.to_qkv_mlp_proj``; block 47 (single) exists here, not in Flux.1."""
    t = {**kohya("lora_unet_double_blocks_7_img_attn_qkv", 4, H, 3 * H, 1, alpha=2),
         **kohya("lora_unet_double_blocks_0_txt_attn_qkv", 2, H, 3 * H, 3, alpha=4),
         **kohya("lora_unet_double_blocks_0_img_mlp_0", 2, H, FF_IN, 5, alpha=2),
         **kohya("lora_unet_single_blocks_47_linear1", 4, H, LINEAR1, 7, alpha=8),
         **kohya("lora_unet_double_stream_modulation_img_lin", 2, H, 6 * H, 9, alpha=1)}
    a = lorakit.load(write_st(tmp_path / "k.safetensors", t))
    assert adapter_family(a) is FLUX2 and a.source_format == "kohya"
    d = to_naming(a, FLUX2, "diffusers")
    stem = "lora_unet_double_blocks_7_img_attn_qkv"
    up, down = t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"]
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        m = d.modules[f"transformer.transformer_blocks.7.attn.{name}"]
        assert torch.equal(m.down, down)  # A shared, B's row block
        np.testing.assert_allclose(lora_delta(m), np_delta(up[j * H:(j + 1) * H], down, 0.5),
                                   rtol=1e-12)
    stem = "lora_unet_double_blocks_0_txt_attn_qkv"
    m = d.modules["transformer.transformer_blocks.0.attn.add_v_proj"]
    np.testing.assert_allclose(lora_delta(m), np_delta(t[f"{stem}.lora_up.weight"][2 * H:],
                                                       t[f"{stem}.lora_down.weight"], 2.0),
                               rtol=1e-12)
    for native, ours, scale in [
            ("double_blocks_0_img_mlp_0", "transformer_blocks.0.ff.linear_in", 1.0),
            ("single_blocks_47_linear1", "single_transformer_blocks.47.attn.to_qkv_mlp_proj", 2.0),
            ("double_stream_modulation_img_lin", "double_stream_modulation_img.linear", 0.5)]:
        stem = f"lora_unet_{native}"
        np.testing.assert_allclose(lora_delta(d.modules[f"transformer.{ours}"]), np_delta(
            t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"], scale), rtol=1e-12)
    assert coverage_line(coverage(a, FLUX2)) == \
        "double blocks 2/8 (7 layer kinds), single blocks 1/48 (attn.to_qkv_mlp_proj only)"
    keys, meta = read_keys(lorakit.save(d, tmp_path / "k2.safetensors", "kohya"))
    assert keys == set(t)  # the very names, rank 4 stacked B (not a block diagonal)
    assert meta["lorakit.family"] == "flux2" and meta["ss_base_model_version"] == "flux2"
    back = lorakit.load(tmp_path / "k2.safetensors").modules[
        "transformer.double_blocks.7.img_attn.qkv"]
    assert back.rank == 4 and torch.equal(back.up, up) and torch.equal(back.down, down)


@pytest.mark.parametrize("layout", ["kohya", "bfl"])
def test_three_split_loras_fuse_into_qkv_block_diagonal(layout, tmp_path):
    """diffusers to_q/to_k/to_v (ranks 2, 3, 4, alphas differ) -> ``img_attn.qkv`` of rank 9
    whose update is the stacked updates, exactly; split back, each update is its own."""
    mods, ref = {}, []
    for j, (name, r, alpha) in enumerate([("to_q", 2, 4.0), ("to_k", 3, 3.0), ("to_v", 4, 1.0)]):
        m = LoraModule(randn(r, H, seed=10 + j), randn(H, r, seed=20 + j), alpha=alpha)
        mods[f"transformer.transformer_blocks.0.attn.{name}"] = m
        ref.append(np_delta(m.up, m.down, alpha / r))
    src = Adapter(modules=mods, component_prefix=True)
    out = lorakit.save(src, tmp_path / "f.safetensors", layout, family="flux2")
    loaded = lorakit.load(out)
    assert adapter_family(loaded) is FLUX2  # lorakit.family in its metadata
    fused = loaded.modules["transformer.double_blocks.0.img_attn.qkv"]
    assert fused.rank == 9
    np.testing.assert_allclose(lora_delta(fused), np.vstack(ref), rtol=1e-6, atol=1e-6)
    split = to_naming(loaded, FLUX2, "diffusers").modules
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        np.testing.assert_allclose(lora_delta(split[f"transformer.transformer_blocks.0.attn.{name}"]),
                                   ref[j], rtol=1e-6, atol=1e-6)


def test_comfyui_file_top_level_modulations_and_final_layer_swap(tmp_path):
    """BFL names under ``diffusion_model.``: ``linear2`` = ``attn.to_out``, the shared
    modulations, the embedders, and ``final_layer.adaLN_modulation.1`` = diffusers'
    ``norm_out.linear`` with shift and scale swapped."""
    t = {**comfy("double_blocks.0.img_attn.qkv", 2, H, 3 * H, 1),
         **comfy("double_blocks.0.txt_mlp.2", 2, 3 * H, H, 3),
         **comfy("single_blocks.3.linear2", 2, LINEAR2_IN, H, 5),
         **comfy("img_in", 2, 16, H, 7), **comfy("txt_in", 2, 24, H, 9),
         **comfy("time_in.in_layer", 2, 256, H, 11), **comfy("guidance_in.out_layer", 2, H, H, 13),
         **comfy("double_stream_modulation_txt.lin", 2, H, 6 * H, 15),
         **comfy("single_stream_modulation.lin", 2, H, 3 * H, 17),
         **comfy("final_layer.linear", 2, H, 16, 19),
         **comfy("final_layer.adaLN_modulation.1", 2, H, 2 * H, 21)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is FLUX2
    d = to_naming(a, FLUX2, "diffusers").modules
    want = {"transformer_blocks.0.ff_context.linear_out": "double_blocks.0.txt_mlp.2",
            "single_transformer_blocks.3.attn.to_out": "single_blocks.3.linear2",
            "x_embedder": "img_in", "context_embedder": "txt_in",
            "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
            "single_stream_modulation.linear": "single_stream_modulation.lin",  # no swap
            "proj_out": "final_layer.linear"}
    for ours, native in want.items():
        p = f"diffusion_model.{native}"
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{p}.lora_B.weight"], t[f"{p}.lora_A.weight"], 1.0), rtol=1e-12)
    p = "diffusion_model.double_blocks.0.img_attn.qkv"
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        np.testing.assert_allclose(lora_delta(d[f"transformer.transformer_blocks.0.attn.{name}"]),
                                   np_delta(t[f"{p}.lora_B.weight"][j * H:(j + 1) * H],
                                            t[f"{p}.lora_A.weight"], 1.0), rtol=1e-12)
    p = "diffusion_model.final_layer.adaLN_modulation.1"
    up = t[f"{p}.lora_B.weight"]
    np.testing.assert_allclose(lora_delta(d["transformer.norm_out.linear"]), np_delta(
        torch.cat([up[H:], up[:H]]), t[f"{p}.lora_A.weight"], 1.0), rtol=1e-12)
    keys, _ = read_keys(lorakit.save(a, tmp_path / "c2.safetensors", "bfl"))
    assert keys == set(t)  # ComfyUI spelling: lora_A/lora_B, no alphas
    keys, _ = read_keys(lorakit.save(to_naming(a, FLUX2, "diffusers"), tmp_path / "c3.safetensors",
                                     "bfl"))
    assert keys == set(t)  # and back from diffusers names: the qkv fused again


def test_names_shared_with_flux1_need_a_hint(tmp_path):
    """Flux.2's BFL blocks are spelled as Flux.1's: such a file is Flux.1 unless its metadata
    (``lorakit.family``, ``modelspec.architecture``), its shapes (Flux.2's feed-forward and
    single-block proportions) or ``--family`` say Flux.2; a name only Flux.2 has decides by
    itself, and Flux.1 / HunyuanVideo names stay theirs."""
    t = {**comfy("double_blocks.0.img_attn.qkv", 2, H, 3 * H, 1),
         **comfy("double_blocks.0.txt_attn.proj", 2, H, H, 3)}  # the same shapes in both
    assert adapter_family(lorakit.load(write_st(tmp_path / "a.safetensors", t))) is FLUX1
    for meta in ({"lorakit.family": "flux2"}, {"modelspec.architecture": "flux-2-dev/lora"},
                 {"ss_base_model_version": "flux2"}):
        a = lorakit.load(write_st(tmp_path / "b.safetensors", t, meta))
        assert adapter_family(a) is FLUX2, meta
    a = lorakit.load(tmp_path / "a.safetensors", family="flux2")
    assert a.metadata["lorakit.family"] == "flux2"
    assert adapter_family(lorakit.load(write_st(tmp_path / "c.safetensors", {
        **t, **comfy("single_stream_modulation.lin", 2, H, 3 * H, 5)}))) is FLUX2
    for native, din, dout in [("single_blocks.0.linear2", LINEAR2_IN, H),
                              ("single_blocks.0.linear1", H, LINEAR1),
                              ("double_blocks.0.img_mlp.0", H, FF_IN),
                              ("double_blocks.0.txt_mlp.2", 3 * H, H)]:
        shaped = {**t, **comfy(native, 2, din, dout, 5)}  # Flux.2's proportions decide
        assert adapter_family(lorakit.load(write_st(tmp_path / "s.safetensors", shaped))) \
            is FLUX2, native
    for native, din, dout in [("single_blocks.0.linear2", 5 * H, H),
                              ("single_blocks.0.linear1", H, 7 * H),
                              ("double_blocks.0.img_mlp.0", H, 4 * H)]:
        shaped = {**t, **comfy(native, 2, din, dout, 5)}  # Flux.1's stay Flux.1's
        assert adapter_family(lorakit.load(write_st(tmp_path / "s.safetensors", shaped))) \
            is FLUX1, native
    k = kohya("lora_unet_single_blocks_0_linear1", 4, H, LINEAR1, 7, alpha=4)
    assert adapter_family(lorakit.load(write_st(tmp_path / "k.safetensors", k))) is FLUX2
    diff = {f"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_{s}.weight":
            randn(2, H) if s == "A" else randn(LINEAR1, 2) for s in "AB"}
    assert adapter_family(lorakit.load(write_st(tmp_path / "d.safetensors", diff))) is FLUX2
    flux1 = {**t, **comfy("double_blocks.0.img_mod.lin", 2, H, 6 * H, 7),
             **comfy("single_blocks.0.modulation.lin", 2, H, 3 * H, 9)}
    assert adapter_family(lorakit.load(write_st(tmp_path / "e.safetensors", flux1))) is FLUX1
    for ours in ("single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.norm.linear",
                 "time_text_embed.guidance_embedder.linear_1"):
        f1 = {f"transformer.{ours}.lora_{s}.weight": randn(2, H) if s == "A" else randn(H, 2)
              for s in "AB"}
        assert adapter_family(lorakit.load(write_st(tmp_path / "f.safetensors", f1))) is FLUX1
    hv = {**comfy("double_blocks.0.img_attn_qkv", 2, H, 3 * H, 1),
          **comfy("txt_in.individual_token_refiner.blocks.0.mlp.fc1", 2, H, 4 * H, 3)}
    assert adapter_family(lorakit.load(write_st(tmp_path / "h.safetensors", hv))) is \
        HUNYUAN_VIDEO


def test_inspect_prints_flux2_coverage(tmp_path):
    t = {}
    for i in range(8):
        t.update(kohya(f"lora_unet_double_blocks_{i}_img_mlp_0", 2, H, FF_IN, i))
    path = write_st(tmp_path / "k.safetensors", t, {"modelspec.architecture": "flux-2-dev/lora"})
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "flux2"
    assert info["coverage_line"] == "double blocks 8/8 (ff.linear_in only), single blocks 0/48"


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "kohya": (kohya("lora_unet_single_stream_modulation_lin", 2, 2, 6, 1),
              "lora_unet_single_stream_modulation_lin.scale_weight"),
    "bfl": ({**comfy("double_blocks.0.img_attn.qkv", 2, 2, 6, 1),
             **comfy("double_stream_modulation_img.lin", 2, 2, 12, 3)},
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_M.weight"),
    "diffusers": ({f"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_{s}.weight":
                   randn(2, 2) for s in "AB"},
                  "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is FLUX2 and clean.source_format == layout
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.double_blocks.8.img_attn.proj",  # double block 8 of 0..7
    "transformer.single_blocks.48.linear2",  # single block 48 of 0..47
    "transformer.double_blocks.0.img_attn.zz",  # a layer Flux.2 does not have
    "transformer.double_blocks.0.img_mod.lin",  # Flux.1's per-block modulation
])
def test_module_flux2_does_not_have(key, tmp_path):
    t = {**comfy("single_stream_modulation.lin", 2, 2, 6, 1),
         **{f"diffusion_model.{key[len('transformer.'):]}.lora_{s}.weight": randn(2, 2)
            for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="Flux.2 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t), family="flux2")
    assert info.value.key == key


def test_diffusers_module_flux2_does_not_have(tmp_path):
    """A Flux.1 diffusers layer in a file read as Flux.2 is an error naming it."""
    bad = "transformer.single_transformer_blocks.0.proj_mlp"
    t = {f"{k}.lora_{s}.weight": randn(2, 2) for s in "AB"
         for k in ("transformer.single_transformer_blocks.0.attn.to_out", bad)}
    with pytest.raises(UnknownLayoutError, match="Flux.2 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t), family="flux2")
    assert info.value.key == bad
