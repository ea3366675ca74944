"""Anima (diffusers ``AnimaModularPipeline``: ``CosmosTransformer3DModel`` + ``AnimaTextConditioner``):
spec-exact ComfyUI / original-names files (``diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight``,
the LLM adapter under ``diffusion_model.llm_adapter.``, the scheme diffusers'
``_convert_non_diffusers_anima_lora_to_diffusers`` and sd-scripts' ``convert_anima_lora_to_comfy``
use) and diffusers files, built by hand; every native name maps to one diffusers layer, exactly;
detection against LTX-Video, SD3 and Wan (which share names), coverage, unknown keys and modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import UnknownLayoutError
from lorakit.formats import adapter_family
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import ANIMA, LTX_VIDEO, SD3, WAN, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import lora_delta, np_delta

DIM = 16


def comfy(stem, r, din, dout, seed, alpha=None, ab=True):
    d, u = ("lora_A", "lora_B") if ab else ("lora_down", "lora_up")
    t = {f"diffusion_model.{stem}.{d}.weight": randn(r, din, seed=seed),
         f"diffusion_model.{stem}.{u}.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(alpha))
    return t


NAMES = {  # diffusers path -> original name (both under their component)
    "transformer.transformer_blocks.27.attn1.to_q": "blocks.27.self_attn.q_proj",
    "transformer.transformer_blocks.0.attn2.to_out.0": "blocks.0.cross_attn.output_proj",
    "transformer.transformer_blocks.1.ff.net.0.proj": "blocks.1.mlp.layer1",
    "transformer.transformer_blocks.1.ff.net.2": "blocks.1.mlp.layer2",
    "transformer.transformer_blocks.2.norm2.linear_1": "blocks.2.adaln_modulation_cross_attn.1",
    "transformer.transformer_blocks.2.norm3.linear_2": "blocks.2.adaln_modulation_mlp.2",
    "transformer.norm_out.linear_2": "final_layer.adaln_modulation.2",
    "transformer.proj_out": "final_layer.linear",
    "transformer.time_embed.t_embedder.linear_1": "t_embedder.1.linear_1",
    "transformer.patch_embed.proj": "x_embedder.proj.1",
    "text_conditioner.blocks.5.cross_attn.o_proj": "llm_adapter.blocks.5.cross_attn.o_proj",
    "text_conditioner.blocks.0.mlp.0": "llm_adapter.blocks.0.mlp.0",
    "text_conditioner.out_proj": "llm_adapter.out_proj",
}


@pytest.mark.parametrize("ab", [True, False], ids=["lora_A", "lora_down"])
def test_comfyui_names_map_with_llm_adapter(ab, tmp_path):
    t = {}
    for n, native in enumerate(NAMES.values()):
        t.update(comfy(native, 2, DIM, DIM, 10 * n, alpha=1, ab=ab))
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is ANIMA
    d = to_naming(a, ANIMA, "diffusers").modules
    assert sorted(d) == sorted(NAMES)
    down, up = ("lora_A", "lora_B") if ab else ("lora_down", "lora_up")
    for ours, native in NAMES.items():
        p = f"diffusion_model.{native}"
        np.testing.assert_allclose(lora_delta(d[ours]), np_delta(
            t[f"{p}.{up}.weight"], t[f"{p}.{down}.weight"], 0.5), rtol=1e-12)
    assert coverage_line(coverage(a, ANIMA)) == \
        "blocks 4/28 (6 layer kinds), llm adapter blocks 2/6 (cross_attn.o_proj, mlp.0 only)"
    out = lorakit.save(to_naming(a, ANIMA, "diffusers"), tmp_path / "c2.safetensors", "bfl")
    keys, meta = read_keys(out)  # lora_A/lora_B, scales folded (what diffusers reads)
    assert keys == {f"diffusion_model.{n}.lora_{s}.weight" for n in NAMES.values() for s in "AB"}
    assert meta["lorakit.family"] == "anima"
    back = to_naming(lorakit.load(out), ANIMA, "diffusers").modules
    for k, m in d.items():
        np.testing.assert_allclose(lora_delta(back[k]), lora_delta(m), rtol=1e-6, atol=1e-7)


def test_diffusers_file_round_trips_through_original_names(tmp_path):
    mods = {k: LoraModule(randn(2, DIM, seed=j), randn(DIM, 2, seed=40 + j), alpha=3.0)
            for j, k in enumerate(NAMES)}
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is ANIMA
    diff = lorakit.save(src, tmp_path / "d.safetensors", "diffusers")
    assert sorted(lorakit.load(diff).modules) == sorted(mods)
    out = lorakit.save(src, tmp_path / "b.safetensors", "bfl")
    keys, _ = read_keys(out)
    assert "diffusion_model.llm_adapter.out_proj.lora_A.weight" in keys
    assert "diffusion_model.blocks.2.adaln_modulation_mlp.2.lora_B.weight" in keys
    back = to_naming(lorakit.load(out), ANIMA, "diffusers").modules
    assert sorted(back) == sorted(mods)
    for k, m in mods.items():
        np.testing.assert_allclose(lora_delta(back[k]), lora_delta(m), rtol=1e-6, atol=1e-7)


def test_detection_against_ltx_sd3_wan():
    for p in ("transformer_blocks.0.norm1.linear_1", "norm_out.linear_2",
              "time_embed.t_embedder.linear_2", "patch_embed.proj", "blocks.0.self_attn.q_proj",
              "blocks.0.cross_attn.output_proj", "blocks.3.mlp.layer2",
              "blocks.0.adaln_modulation_self_attn.1", "final_layer.adaln_modulation.1",
              "t_embedder.1.linear_1", "x_embedder.proj.1"):
        assert detect_family([f"transformer.{p}"]) is ANIMA, p
    assert detect_family(["text_conditioner.in_proj"]) is ANIMA  # its own component
    # an Anima-only name rules out the families that share its block names
    both = ["transformer.transformer_blocks.0.attn1.to_q", "transformer.transformer_blocks.0.attn2.to_k",
            "transformer.transformer_blocks.0.norm1.linear_2"]
    assert detect_family(both) is ANIMA
    shared = ["transformer.transformer_blocks.0.attn1.to_q"]
    assert detect_family(shared) is LTX_VIDEO
    assert detect_family(shared, {"lorakit.family": "anima"}) is ANIMA
    assert detect_family(shared, {"modelspec.architecture": "anima/lora"}) is ANIMA
    # the others' own names stay theirs
    assert detect_family(["transformer.transformer_blocks.0.attn2.to_q"]) is SD3
    assert detect_family(["transformer.blocks.0.self_attn.q"]) is WAN
    assert detect_family(["transformer.blocks.0.attn1.to_q"]) is WAN
    assert detect_family(["transformer.caption_projection.linear_1",
                          "transformer.transformer_blocks.0.ff.net.2"]) is LTX_VIDEO


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (comfy("blocks.0.mlp.layer1", 2, DIM, 2 * DIM, 1),
            "diffusion_model.blocks.0.mlp.layer1.lora_M.weight"),
    "diffusers": ({f"text_conditioner.blocks.0.self_attn.q_proj.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, "text_conditioner.blocks.0.self_attn.q_proj.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is ANIMA
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.transformer_blocks.28.attn1.to_q",  # block 28 of 0..27
    "transformer.transformer_blocks.0.norm1.linear_3",  # Cosmos' are linear_1 / linear_2
    "text_conditioner.blocks.6.mlp.0",  # LLM adapter block 6 of 0..5
    "text_conditioner.blocks.0.self_attn.to_q",  # the adapter's are q_proj..o_proj
])
def test_module_anima_does_not_have(key, tmp_path):
    t = {**{f"transformer.transformer_blocks.0.norm1.linear_1.lora_{s}.weight": randn(2, 2)
            for s in "AB"}, **{f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="Anima does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key
