"""Flux.3 (diffusers ``Flux3Transformer2DModel``): spec-exact ComfyUI / original-names files
(``diffusion_model.content_mode_blocks.image.0.q_proj.lora_A.weight``, the scheme diffusers'
``_convert_non_diffusers_flux3_lora_to_diffusers`` reads) and diffusers files, built by hand; every
native name maps to one diffusers layer (``final_layer.image.adaLN_modulation.1`` with shift and
scale swapped, exactly); detection against Flux.1 and Flux.2 (which share names), coverage,
unknown keys and modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import UnknownLayoutError
from lorakit.formats import adapter_family
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import FLUX1, FLUX2, FLUX3, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import lora_delta, np_delta

DIM = 16


def comfy(stem, r, din, dout, seed, alpha=None, ab=False):
    d, u = ("lora_A", "lora_B") if ab else ("lora_down", "lora_up")
    t = {f"diffusion_model.{stem}.{d}.weight": randn(r, din, seed=seed),
         f"diffusion_model.{stem}.{u}.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(alpha))
    return t


NAMES = {  # diffusers name -> original name
    "mode_blocks.image.4.attn.to_q": "content_mode_blocks.image.4.q_proj",
    "mode_blocks.image_cond.0.attn.to_out.0": "content_mode_blocks.image_cond.0.attn_out",
    "txt_mode_blocks.2.ff.linear_in": "txt_mode_blocks.2.mlp_in",
    "single_transformer_blocks.27.attn.to_v": "single_blocks.27.v_proj",
    "single_transformer_blocks.0.ff.linear_out": "single_blocks.0.mlp_out",
    "x_embedders.image_cond": "emb_in.image_cond", "context_embedder": "txt_in",
    "timestep_embedder.linear_2": "time_in.out_layer",
    "target_timestep_embedder.linear_1": "ref_time_in.in_layer",
    "early_stream_modulations.txt.linear": "early_stream_modulations.txt.lin",
    "single_stream_modulations.image.linear": "single_stream_modulations.image.lin",
    "proj_out": "final_layer.image.linear",
}


def test_comfyui_names_map_and_final_layer_swaps(tmp_path):
    t = {}
    for n, native in enumerate(NAMES.values()):
        t.update(comfy(native, 2, DIM, DIM, 10 * n, alpha=1))
    t.update(comfy("final_layer.image.adaLN_modulation.1", 3, DIM, 2 * DIM, 99, alpha=6))
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is FLUX3
    d = to_naming(a, FLUX3, "diffusers").modules
    for ours, native in NAMES.items():
        p = f"diffusion_model.{native}"
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{p}.lora_up.weight"], t[f"{p}.lora_down.weight"], 0.5), rtol=1e-12)
    p = "diffusion_model.final_layer.image.adaLN_modulation.1"
    up, down = t[f"{p}.lora_up.weight"], t[f"{p}.lora_down.weight"]
    swapped = torch.cat([up[DIM:], up[:DIM]])  # (shift, scale) -> diffusers' (scale, shift)
    np.testing.assert_allclose(lora_delta(d["transformer.norm_out.linear"]),
                               np_delta(swapped, down, 2.0), rtol=1e-12)
    assert coverage_line(coverage(a, FLUX3)) == \
        "image mode blocks 1/5 (attn.to_q only), image_cond mode blocks 1/5 (attn.to_out.0 " \
        "only), text mode blocks 1/5 (ff.linear_in only), single blocks 2/28 (attn.to_v, " \
        "ff.linear_out only)"
    out = lorakit.save(to_naming(a, FLUX3, "diffusers"), tmp_path / "c2.safetensors", "bfl")
    keys, meta = read_keys(out)  # written as lora_A/lora_B, scales folded (as diffusers reads)
    assert keys == {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B") for k in t
                    if not k.endswith(".alpha")}
    assert meta["lorakit.family"] == "flux3"
    back = to_naming(lorakit.load(out), FLUX3, "diffusers").modules
    for k, m in d.items():
        np.testing.assert_allclose(lora_delta(back[k]), lora_delta(m), rtol=1e-6, atol=1e-7)


def test_diffusers_file_writes_original_names_exactly(tmp_path):
    mods = {}
    for j, ours in enumerate((*NAMES, "norm_out.linear")):
        out = 2 * DIM if ours == "norm_out.linear" else DIM
        mods[f"transformer.{ours}"] = LoraModule(randn(2, DIM, seed=j), randn(out, 2, seed=50 + j),
                                                 alpha=3.0)
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is FLUX3
    out = lorakit.save(src, tmp_path / "b.safetensors", "bfl")
    keys, _ = read_keys(out)
    assert "diffusion_model.final_layer.image.adaLN_modulation.1.lora_A.weight" in keys
    assert "diffusion_model.content_mode_blocks.image.4.q_proj.lora_B.weight" in keys
    back = to_naming(lorakit.load(out), FLUX3, "diffusers").modules
    assert sorted(back) == sorted(mods)
    for k, m in mods.items():
        np.testing.assert_allclose(lora_delta(back[k]), lora_delta(m), rtol=1e-6, atol=1e-7)


def test_detection_against_flux1_and_flux2():
    for p in ("mode_blocks.image.0.attn.to_q", "txt_mode_blocks.0.ff.linear_out",
              "single_transformer_blocks.0.attn.to_out.0", "single_blocks.0.q_proj",
              "content_mode_blocks.image_cond.1.mlp_out", "x_embedders.image",
              "early_stream_modulations.image.lin", "final_layer.image.linear",
              "timestep_embedder.linear_1"):
        assert detect_family([f"transformer.{p}"]) is FLUX3, p
    # a Flux.3-only name rules Flux.1 out even beside the names Flux.1 shares
    assert detect_family(["transformer.single_transformer_blocks.0.attn.to_q",
                          "transformer.single_transformer_blocks.0.ff.linear_in"]) is FLUX3
    shared = ["transformer.single_transformer_blocks.0.attn.to_q"]
    assert detect_family(shared) is FLUX1
    assert detect_family(shared, {"lorakit.family": "flux3"}) is FLUX3
    assert detect_family(shared, {"modelspec.architecture": "flux-3/lora"}) is FLUX3
    # Flux.1's and Flux.2's own names stay theirs
    assert detect_family(["transformer.single_transformer_blocks.0.proj_mlp"]) is FLUX1
    assert detect_family(["transformer.single_blocks.0.linear1"]) is FLUX1
    assert detect_family(["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"]) is FLUX2
    assert detect_family(["transformer.double_blocks.0.img_mlp.0"]) is FLUX1
    assert detect_family(["transformer.time_guidance_embed.timestep_embedder.linear_1"]) is FLUX2


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (comfy("single_blocks.0.attn_out", 2, DIM, DIM, 1, ab=True),
            "diffusion_model.single_blocks.0.attn_out.lora_M.weight"),
    "diffusers": ({f"transformer.mode_blocks.image.0.attn.to_q.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, "transformer.mode_blocks.image.0.attn.to_q.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is FLUX3
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.mode_blocks.image.5.attn.to_q",  # mode block 5 of 0..4
    "transformer.single_transformer_blocks.28.ff.linear_in",  # single block 28 of 0..27
    "transformer.mode_blocks.txt.0.attn.to_q",  # the text's are txt_mode_blocks
    "transformer.single_transformer_blocks.0.attn.norm_q",  # a norm, no linear layer
])
def test_module_flux3_does_not_have(key, tmp_path):
    t = {**{f"transformer.mode_blocks.image.0.attn.to_k.lora_{s}.weight": randn(2, 2)
            for s in "AB"}, **{f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="Flux.3 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key
