"""Ideogram 4 (diffusers ``Ideogram4Transformer2DModel``): spec-exact ComfyUI / ai-toolkit files of
the original names (``diffusion_model.layers.0.attention.qkv.lora_down.weight`` + ``.alpha`` or
``lora_A``/``lora_B``, ``conditional_transformer.`` for the pipeline's conditional transformer:
the scheme diffusers' ``_convert_non_diffusers_ideogram4_lora_to_diffusers`` reads) and diffusers
files, built by hand; the fused qkv (three equal row blocks: no grouped-query attention) split
and fused exactly against numpy; detection against Lumina 2 and Z-Image (which share names),
coverage, unknown keys and modules."""

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
from lorakit.formats.families import IDEOGRAM4, LUMINA2, ZIMAGE, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import lora_delta, np_delta

DIM = 24  # hidden 24 = 3 heads of 8, as many key/value heads: qkv is 3 equal row blocks


def original(stem, r, din, dout, seed, alpha=None, prefix="diffusion_model.", ab=False):
    down, up = ("lora_A", "lora_B") if ab else ("lora_down", "lora_up")
    t = {f"{prefix}{stem}.{down}.weight": randn(r, din, seed=seed),
         f"{prefix}{stem}.{up}.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"{prefix}{stem}.alpha"] = torch.tensor(float(alpha))
    return t


@pytest.mark.parametrize("spelling", ["kohya", "ab", "conditional"])
def test_original_qkv_splits_in_thirds_and_names_map(spelling, tmp_path):
    kw = {"ab": spelling != "kohya",
          "prefix": "conditional_transformer." if spelling == "conditional" else "diffusion_model."}
    t = {**original("layers.33.attention.qkv", 4, DIM, 3 * DIM, 1, alpha=2, **kw),
         **original("layers.0.attention.o", 2, DIM, DIM, 3, alpha=1, **kw),
         **original("layers.0.feed_forward.w2", 2, 64, DIM, 5, **kw),
         **original("layers.0.adaln_modulation", 2, 8, 4 * DIM, 7, alpha=4, **kw),
         **original("input_proj", 2, 16, DIM, 9, alpha=2, **kw),
         **original("llm_cond_proj", 2, 32, DIM, 11, alpha=2, **kw),
         **original("t_embedding.mlp_in", 2, DIM, DIM, 13, alpha=2, **kw),
         **original("adaln_proj", 2, DIM, 8, 15, alpha=2, **kw),
         **original("final_layer.linear", 2, DIM, 16, 17, alpha=2, **kw),
         **original("final_layer.adaln_modulation", 2, 8, DIM, 19, alpha=2, **kw)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is IDEOGRAM4
    d = to_naming(a, IDEOGRAM4, "diffusers").modules
    pre, up_s, down_s = kw["prefix"], *(("lora_B", "lora_A") if kw["ab"] else
                                        ("lora_up", "lora_down"))
    p = f"{pre}layers.33.attention.qkv"
    up, down = t[f"{p}.{up_s}.weight"], t[f"{p}.{down_s}.weight"]
    for j, name in enumerate(("to_q", "to_k", "to_v")):  # (24, 24) = (2/4) * B[rows] @ A each
        np.testing.assert_allclose(lora_delta(d[f"transformer.layers.33.attention.{name}"]),
                                   np_delta(up[j * DIM:(j + 1) * DIM], down, 0.5), rtol=1e-12)
    want = {"layers.0.attention.to_out.0": ("layers.0.attention.o", 0.5),
            "layers.0.feed_forward.w2": ("layers.0.feed_forward.w2", 1.0),
            "layers.0.adaln_modulation": ("layers.0.adaln_modulation", 2.0),
            **{n: (n, 1.0) for n in ("input_proj", "llm_cond_proj", "t_embedding.mlp_in",
                                     "adaln_proj", "final_layer.linear",
                                     "final_layer.adaln_modulation")}}
    for ours, (native, scale) in want.items():
        q = f"{pre}{native}"
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{q}.{up_s}.weight"], t[f"{q}.{down_s}.weight"], scale), rtol=1e-12)
    assert coverage_line(coverage(a, IDEOGRAM4)) == "layers 2/34 (6 layer kinds)"
    out = lorakit.save(to_naming(a, IDEOGRAM4, "diffusers"), tmp_path / "c2.safetensors", "bfl")
    keys, meta = read_keys(out)  # written as diffusion_model. + lora_down/lora_up + .alpha
    assert keys == {k.replace(pre, "diffusion_model.").replace(".lora_A.", ".lora_down.")
                    .replace(".lora_B.", ".lora_up.") for k in t} | {
        "diffusion_model.layers.0.feed_forward.w2.alpha"}
    assert meta["lorakit.family"] == "ideogram4"
    back = lorakit.load(out).modules["transformer.layers.33.attention.qkv"]
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
    mods["transformer.layers.3.adaln_modulation"] = LoraModule(randn(2, 8), randn(96, 2), 2.0)
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is IDEOGRAM4
    out = lorakit.save(src, tmp_path / "c.safetensors", "bfl")
    fused = lorakit.load(out).modules["transformer.layers.3.attention.qkv"]
    assert fused.rank == 9 and fused.up.shape == (3 * DIM, 9)
    np.testing.assert_allclose(lora_delta(fused), np.vstack(ref), rtol=1e-6, atol=1e-6)


def test_detection_against_lumina2_and_zimage(tmp_path):
    for name in ("layers.0.adaln_modulation", "layers.0.attention.o", "input_proj",
                 "llm_cond_proj", "t_embedding.mlp_out", "adaln_proj",
                 "final_layer.adaln_modulation"):
        assert detect_family([f"transformer.{name}"]) is IDEOGRAM4, name
        # with names it shares: Lumina 2's fused qkv, Z-Image's diffusers attention
        assert detect_family([f"transformer.{name}", "transformer.layers.0.attention.qkv",
                              "transformer.layers.1.attention.to_q"]) is IDEOGRAM4, name
    # Lumina 2's and Z-Image's own names still decide for them
    assert detect_family(["transformer.layers.0.attention.qkv",
                          "transformer.layers.0.adaLN_modulation.1"]) is LUMINA2
    assert detect_family(["transformer.layers.0.attention.to_q",
                          "transformer.layers.0.adaLN_modulation.0"]) is ZIMAGE
    assert detect_family(["transformer.layers.0.attention.to_q",
                          "transformer.layers.0.adaln_modulation"]) is IDEOGRAM4
    shared = ["transformer.layers.0.attention.qkv"]  # the original names all three spell alike
    assert detect_family(shared) is LUMINA2
    assert detect_family(shared, {"lorakit.family": "ideogram4"}) is IDEOGRAM4
    assert detect_family(shared, {"modelspec.architecture": "ideogram-4/lora"}) is IDEOGRAM4
    assert detect_family(shared, shapes={shared[0]: (3 * 4608, 4608)}) is IDEOGRAM4
    assert detect_family(shared, shapes={shared[0]: (3 * 3840, 3840)}) is ZIMAGE
    split = ["transformer.layers.0.attention.to_q"]  # Z-Image's diffusers names too
    assert detect_family(split) is ZIMAGE
    assert detect_family(split, {"lorakit.family": "ideogram4"}) is IDEOGRAM4
    assert detect_family(split, shapes={split[0]: (4608, 4608)}) is IDEOGRAM4
    assert detect_family(split, shapes={split[0]: (3840, 3840)}) is ZIMAGE
    ff = ["transformer.layers.0.feed_forward.w1"]  # no family's marker: metadata decides
    assert detect_family(ff) is None
    assert detect_family(ff, {"ss_base_model_version": "ideogram4"}) is IDEOGRAM4
    # a file of shared names reads as Ideogram 4 with --family
    t = original("layers.0.attention.qkv", 2, DIM, 3 * DIM, 1, alpha=2)
    path = write_st(tmp_path / "s.safetensors", t)
    assert adapter_family(lorakit.load(path)) is ZIMAGE  # 3 x its input: not Lumina 2's 3 : 1 : 1
    a = lorakit.load(path, family="ideogram4")
    assert adapter_family(a) is IDEOGRAM4  # kept in the adapter's metadata
    assert "transformer.layers.0.attention.to_v" in to_naming(a, IDEOGRAM4, "diffusers").modules


def test_inspect_coverage(tmp_path):
    t = {}
    for i in range(34):
        t.update({f"transformer.layers.{i}.attention.to_q.lora_{s}.weight":
                  randn(2, DIM, seed=i) if s == "A" else randn(DIM, 2, seed=i) for s in "AB"})
    t.update({f"transformer.layers.0.adaln_modulation.lora_{s}.weight": randn(2, 2) for s in "AB"})
    path = write_st(tmp_path / "d.safetensors", t)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "ideogram4"
    assert info["coverage_line"] == "layers 34/34 (adaln_modulation, attention.to_q only)"


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (original("layers.0.adaln_modulation", 2, 8, 4 * DIM, 1, alpha=2),
            "diffusion_model.layers.0.adaln_modulation.lora_M.weight"),
    "bfl-conditional": (original("layers.0.attention.o", 2, DIM, DIM, 1, ab=True,
                                 prefix="conditional_transformer."),
                        "conditional_transformer.layers.0.attention.o.lora_C.weight"),
    "diffusers": ({f"transformer.layers.0.adaln_modulation.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, "transformer.layers.0.adaln_modulation.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is IDEOGRAM4
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.layers.34.attention.to_q",  # layer 34 of 0..33
    "transformer.layers.0.adaLN_modulation.0",  # Z-Image's spelling, not Ideogram's
    "transformer.embed_image_indicator",  # an embedding, no LoRA target here
    "transformer.layers.0.attention.norm_q",  # a norm
])
def test_module_ideogram4_does_not_have(key, tmp_path):
    t = {**{f"transformer.layers.0.adaln_modulation.lora_{s}.weight": randn(2, 2) for s in "AB"},
         **{f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="Ideogram 4 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t), family="ideogram4")
    assert info.value.key == key


def test_original_module_ideogram4_does_not_have(tmp_path):
    t = {**original("layers.0.attention.o", 2, DIM, DIM, 1, alpha=2),
         **original("layers.34.attention.qkv", 2, DIM, 3 * DIM, 3, alpha=2)}
    with pytest.raises(UnknownLayoutError, match="Ideogram 4 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == "transformer.layers.34.attention.qkv"


def test_peft_folder_round_trip(tmp_path):
    """``convert --to peft``: the transformer's PEFT folder (diffusers names, its class in
    ``auto_mapping``) reads back with the same updates."""
    t = {**original("layers.0.attention.qkv", 2, DIM, 3 * DIM, 1, alpha=4),
         **original("final_layer.adaln_modulation", 2, 8, DIM, 3, alpha=2)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    out = lorakit.save(lorakit.convert(a, "peft"), tmp_path / "peft", "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["auto_mapping"] == {"base_model_class": "Ideogram4Transformer2DModel"}
    back = lorakit.load(out)
    d = to_naming(a, IDEOGRAM4, "diffusers").modules
    assert sorted(back.modules) == sorted(k[len("transformer."):] for k in d)
    for k, m in back.modules.items():
        np.testing.assert_allclose(lora_delta(m), lora_delta(d[f"transformer.{k}"]), rtol=1e-6)
