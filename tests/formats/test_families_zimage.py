"""Z-Image (diffusers ``ZImageTransformer2DModel``): spec-exact ComfyUI / original-names files
(``diffusion_model.layers.0.attention.qkv.lora_down.weight`` + ``.alpha``, the scheme diffusers'
``_convert_non_diffusers_z_image_lora_to_diffusers`` reads) and diffusers files
(``transformer.layers.0.attention.to_q.lora_A.weight``), built by hand; the fused qkv (equal row
blocks) split and fused exactly against numpy; detection against Lumina 2 (which shares the
original names), coverage, unknown keys and modules."""

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
from lorakit.formats.families import LUMINA2, ZIMAGE, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import lora_delta, np_delta

DIM = 24  # hidden 24 = 3 heads of 8, as many key/value heads: qkv is 3 equal row blocks


def comfy(stem, r, din, dout, seed, alpha=None):
    t = {f"diffusion_model.{stem}.lora_down.weight": randn(r, din, seed=seed),
         f"diffusion_model.{stem}.lora_up.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(alpha))
    return t


def test_comfyui_qkv_splits_in_thirds_and_names_map(tmp_path):
    t = {**comfy("layers.29.attention.qkv", 4, DIM, 3 * DIM, 1, alpha=2),
         **comfy("noise_refiner.1.attention.qkv", 2, DIM, 3 * DIM, 3, alpha=2),
         **comfy("context_refiner.0.feed_forward.w3", 2, DIM, 64, 5, alpha=2),
         **comfy("layers.0.adaLN_modulation.0", 2, DIM, 4 * DIM, 7, alpha=2),
         **comfy("layers.0.attention.out", 2, DIM, DIM, 9, alpha=2),
         **comfy("t_embedder.mlp.0", 2, 256, DIM, 11, alpha=2),
         **comfy("cap_embedder.1", 2, 16, DIM, 13, alpha=2),
         **comfy("all_final_layer.2-1.linear", 2, DIM, 64, 15, alpha=2),
         **comfy("all_x_embedder.2-1", 2, 64, DIM, 17, alpha=2)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is ZIMAGE
    d = to_naming(a, ZIMAGE, "diffusers").modules
    p = "diffusion_model.layers.29.attention.qkv"
    up, down = t[f"{p}.lora_up.weight"], t[f"{p}.lora_down.weight"]
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        np.testing.assert_allclose(lora_delta(d[f"transformer.layers.29.attention.{name}"]),
                                   np_delta(up[j * DIM:(j + 1) * DIM], down, 0.5), rtol=1e-12)
    assert d["transformer.noise_refiner.1.attention.to_v"].up.shape == (DIM, 2)
    want = {"context_refiner.0.feed_forward.w3": "context_refiner.0.feed_forward.w3",
            "layers.0.adaLN_modulation.0": "layers.0.adaLN_modulation.0",
            "layers.0.attention.to_out.0": "layers.0.attention.out",
            "t_embedder.mlp.0": "t_embedder.mlp.0", "cap_embedder.1": "cap_embedder.1",
            "all_final_layer.2-1.linear": "all_final_layer.2-1.linear",
            "all_x_embedder.2-1": "all_x_embedder.2-1"}
    for ours, native in want.items():
        p = f"diffusion_model.{native}"
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{p}.lora_up.weight"], t[f"{p}.lora_down.weight"], 1.0), rtol=1e-12)
    assert coverage_line(coverage(a, ZIMAGE)) == \
        "layers 2/30 (5 layer kinds), noise refiner blocks 1/2 (attention.to_k, " \
        "attention.to_q, attention.to_v only), context refiner blocks 1/2 (feed_forward.w3 only)"
    out = lorakit.save(to_naming(a, ZIMAGE, "diffusers"), tmp_path / "c2.safetensors", "bfl")
    keys, meta = read_keys(out)
    assert keys == set(t)
    assert meta["lorakit.family"] == "zimage"
    back = lorakit.load(out).modules["transformer.layers.29.attention.qkv"]
    assert back.rank == 4 and torch.equal(back.down, down)
    np.testing.assert_allclose(lora_delta(back), np_delta(up, down, 0.5), rtol=1e-6)


def test_split_loras_fuse_into_attention_qkv_block_diagonal(tmp_path):
    """diffusers to_q, to_k, to_v (24 rows each), ranks 2/3/4 -> ``attention.qkv`` of rank 9
    whose update is the stacked updates."""
    mods, ref = {}, []
    for j, (name, r, alpha) in enumerate([("to_q", 2, 4.0), ("to_k", 3, 3.0), ("to_v", 4, 1.0)]):
        m = LoraModule(randn(r, DIM, seed=10 + j), randn(DIM, r, seed=20 + j), alpha=alpha)
        mods[f"transformer.layers.3.attention.{name}"] = m
        ref.append(np_delta(m.up, m.down, alpha / r))
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is ZIMAGE
    out = lorakit.save(src, tmp_path / "c.safetensors", "bfl")
    fused = lorakit.load(out).modules["transformer.layers.3.attention.qkv"]
    assert fused.rank == 9 and fused.up.shape == (3 * DIM, 9)
    np.testing.assert_allclose(lora_delta(fused), np.vstack(ref), rtol=1e-6, atol=1e-6)


def test_detection_against_lumina2_and_inspect_coverage(tmp_path):
    assert detect_family(["transformer.layers.0.attention.to_k"]) is ZIMAGE
    assert detect_family(["transformer.all_x_embedder.2-1"]) is ZIMAGE
    assert detect_family(["transformer.noise_refiner.0.attention.to_q"]) is ZIMAGE
    assert detect_family(["transformer.layers.0.attn.to_k"]) is LUMINA2
    assert detect_family(["transformer.noise_refiner.0.attn.to_q"]) is LUMINA2
    assert detect_family(["model.layers.0.self_attn.q_proj"]) is None  # an LLM stays one
    shared = ["transformer.layers.0.attention.qkv"]  # the original names both spell alike
    assert detect_family(shared) is LUMINA2
    assert detect_family(shared, {"modelspec.architecture": "z-image/lora"}) is ZIMAGE
    assert detect_family(shared, {"lorakit.family": "zimage"}) is ZIMAGE
    assert detect_family(shared, shapes={shared[0]: (72, 24)}) is ZIMAGE
    assert detect_family(shared, shapes={shared[0]: (40, 24)}) is LUMINA2
    t = {}
    for i in range(30):
        t.update({f"transformer.layers.{i}.attention.to_q.lora_{s}.weight":
                  randn(2, DIM, seed=i) if s == "A" else randn(DIM, 2, seed=i) for s in "AB"})
    path = write_st(tmp_path / "d.safetensors", t)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "zimage"
    assert info["coverage_line"] == "layers 30/30 (attention.to_q only), noise refiner blocks " \
                                    "0/2, context refiner blocks 0/2"


def test_shared_original_names_with_zimage_shapes_load_as_zimage(tmp_path):
    t = comfy("layers.0.attention.qkv", 2, DIM, 3 * DIM, 1, alpha=2)
    assert adapter_family(lorakit.load(write_st(tmp_path / "z.safetensors", t))) is ZIMAGE


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (comfy("layers.0.adaLN_modulation.0", 2, DIM, 4 * DIM, 1, alpha=2),
            "diffusion_model.layers.0.adaLN_modulation.0.lora_M.weight"),
    "kohya": ({"lora_unet_all_final_layer_2-1_adaLN_modulation_1.lora_down.weight": randn(2, DIM),
               "lora_unet_all_final_layer_2-1_adaLN_modulation_1.lora_up.weight": randn(DIM, 2),
               "lora_unet_all_final_layer_2-1_adaLN_modulation_1.alpha": torch.tensor(2.0)},
              "lora_unet_all_final_layer_2-1_adaLN_modulation_1.lora_mystery.weight"),
    "diffusers": ({f"transformer.noise_refiner.0.attention.to_q.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, "transformer.noise_refiner.0.attention.to_q.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is ZIMAGE
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.context_refiner.0.adaLN_modulation.0",  # the context refiner is not modulated
    "transformer.layers.30.attention.to_q",  # layer 30 of 0..29
    "transformer.noise_refiner.2.feed_forward.w1",  # refiner block 2 of 0..1
])
def test_module_zimage_does_not_have(key, tmp_path):
    t = {**{f"transformer.layers.0.attention.to_k.lora_{s}.weight": randn(2, 2) for s in "AB"},
         **{f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="Z-Image does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key
