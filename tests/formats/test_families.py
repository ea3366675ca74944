"""Families and layouts (issue 16): exact fuse/split, spec-exact files per layout read and
checked with independent numpy, coverage, unknown keys, kohya metadata, the one-way load path."""

from __future__ import annotations

import ast
import json
from pathlib import Path

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
from lorakit.formats.families import FLUX1, SD3, WAN
from lorakit.formats.rename import to_naming
from tests.conftest import require_real
from tests.formats.helpers import randn, read_keys, write_st

H = 8  # tiny hidden size; Flux/SD3 ratios are the real ones


def np_delta(up, down, scale):
    """``scale * B @ A`` in float64 numpy (the reference)."""
    return scale * (up.double().numpy() @ down.double().numpy())


def lora_delta(m: LoraModule) -> np.ndarray:
    r = m.down.shape[0]
    return (m.alpha / r) * (m.up.double().numpy().reshape(m.up.shape[0], r)
                            @ m.down.double().numpy().reshape(r, -1))


def kohya(stem, r, din, dout, seed, alpha=None):
    t = {f"{stem}.lora_down.weight": randn(r, din, seed=seed),
         f"{stem}.lora_up.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return t


# ------------------------------------------------------------------------- fused <-> split

def test_kohya_flux_qkv_splits_into_three_loras_sharing_A(tmp_path):
    t = {**kohya("lora_unet_double_blocks_0_img_attn_qkv", 4, H, 3 * H, 1, alpha=2),
         **kohya("lora_unet_single_blocks_0_linear1", 4, H, 7 * H, 3, alpha=8)}
    a = lorakit.load(write_st(tmp_path / "k.safetensors", t))
    assert adapter_family(a) is FLUX1 and a.source_format == "kohya"
    d = to_naming(a, FLUX1, "diffusers")
    up = t["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    down = t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        m = d.modules[f"transformer.transformer_blocks.0.attn.{name}"]
        assert m.down.data_ptr() == a.modules["transformer.double_blocks.0.img_attn.qkv"].down \
            .data_ptr()  # shares A
        np.testing.assert_allclose(lora_delta(m), np_delta(up[j * H:(j + 1) * H], down, 0.5),
                                   rtol=1e-12)
    up1 = t["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    down1 = t["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    rows = {"attn.to_q": (0, H), "attn.to_k": (H, 2 * H), "attn.to_v": (2 * H, 3 * H),
            "proj_mlp": (3 * H, 7 * H)}
    for name, (lo, hi) in rows.items():
        m = d.modules[f"transformer.single_transformer_blocks.0.{name}"]
        np.testing.assert_allclose(lora_delta(m), np_delta(up1[lo:hi], down1, 2.0), rtol=1e-12)
    # and back: the very tensors (rank 4, stacked B), not a block diagonal
    k = lorakit.save(d, tmp_path / "k2.safetensors", "kohya")
    keys, _ = read_keys(k)
    assert keys == set(t)
    back = lorakit.load(k).modules["transformer.single_blocks.0.linear1"]
    assert back.rank == 4 and torch.equal(back.up, up1) and torch.equal(back.down, down1)


def test_three_split_loras_fuse_block_diagonal_and_shrink_through_the_engine(tmp_path):
    """to_q/to_k/to_v (ranks 2, 3, 4, different alphas) -> kohya qkv of rank 9 whose update is
    exactly the stacked updates; ``convert --rank 4`` gives the Eckart-Young optimum."""
    mods, ref = {}, []
    for j, (name, r, alpha) in enumerate([("to_q", 2, 4.0), ("to_k", 3, 3.0), ("to_v", 4, 1.0)]):
        m = LoraModule(randn(r, H, seed=10 + j), randn(H, r, seed=20 + j), alpha=alpha)
        mods[f"transformer.transformer_blocks.0.attn.{name}"] = m
        ref.append(np_delta(m.up, m.down, alpha / r))
    src = lorakit.save(Adapter(modules=mods, component_prefix=True),
                       tmp_path / "d.safetensors", "diffusers")
    want = np.vstack(ref)  # (3H, H)
    out = tmp_path / "k.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o", str(out),
                                   "--family", "flux1"])
    assert res.exit_code == 0, res.output
    fused = lorakit.load(out).modules["transformer.double_blocks.0.img_attn.qkv"]
    assert fused.rank == 9
    np.testing.assert_allclose(lora_delta(fused), want, rtol=1e-6, atol=1e-6)
    blocks = fused.up.reshape(3, H, 9)  # B is block-diagonal: zero off the diagonal blocks
    assert not blocks[0, :, 2:].any() and not blocks[1, :, :2].any() and not blocks[2, :, :5].any()
    small = tmp_path / "k4.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o", str(small),
                                   "--family", "flux1", "--rank", "4"])
    assert res.exit_code == 0, res.output
    m4 = lorakit.load(small).modules["transformer.double_blocks.0.img_attn.qkv"]
    assert m4.rank == 4
    s = np.linalg.svd(want, compute_uv=False)
    err = np.linalg.norm(lora_delta(m4) - want)
    assert abs(err / np.sqrt((s[4:] ** 2).sum()) - 1) < 1e-5  # Eckart-Young


def test_bfl_final_layer_swaps_shift_and_scale(tmp_path):
    """BFL ``final_layer.adaLN_modulation.1`` is (shift, scale); diffusers' ``norm_out.linear``
    (scale, shift): the split swaps B's halves."""
    t = {f"diffusion_model.final_layer.adaLN_modulation.1.lora_{s}.weight": v for s, v in
         (("A", randn(2, H, seed=1)), ("B", randn(2 * H, 2, seed=2)))}
    t.update({f"diffusion_model.double_blocks.0.img_mlp.0.lora_{s}.weight": v for s, v in
              (("A", randn(2, H, seed=3)), ("B", randn(4 * H, 2, seed=4)))})
    a = lorakit.load(write_st(tmp_path / "bfl.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is FLUX1
    m = to_naming(a, FLUX1, "diffusers").modules["transformer.norm_out.linear"]
    up = t["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"]
    swapped = torch.cat([up[H:], up[:H]])
    np.testing.assert_allclose(lora_delta(m), np_delta(swapped, t[
        "diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight"], 1.0), rtol=1e-12)
    out = lorakit.save(a, tmp_path / "k.safetensors", "kohya")  # native again: swapped back
    b = lorakit.load(out).modules["transformer.final_layer.adaLN_modulation.1"]
    assert torch.equal(b.up, up)


def test_sd3_kohya_native_names(tmp_path):
    """sd-scripts SD3: ``joint_blocks.N.x_block.attn.qkv`` / ``context_block.attn.qkv``."""
    t = {**kohya("lora_unet_joint_blocks_0_x_block_attn_qkv", 2, H, 3 * H, 1, alpha=4),
         **kohya("lora_unet_joint_blocks_0_context_block_attn_qkv", 2, H, 3 * H, 3, alpha=4),
         **kohya("lora_unet_joint_blocks_0_x_block_mlp_fc1", 2, H, 4 * H, 5, alpha=4),
         **kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 2, H, H, 7)}
    a = lorakit.load(write_st(tmp_path / "sd3.safetensors", t))
    assert adapter_family(a) is SD3
    d = to_naming(a, SD3, "diffusers")
    up = t["lora_unet_joint_blocks_0_context_block_attn_qkv.lora_up.weight"]
    down = t["lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight"]
    m = d.modules["transformer.transformer_blocks.0.attn.add_v_proj"]
    np.testing.assert_allclose(lora_delta(m), np_delta(up[2 * H:], down, 2.0), rtol=1e-12)
    assert "transformer.transformer_blocks.0.ff.net.0.proj" in d.modules
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in d.modules
    keys, meta = read_keys(lorakit.save(d, tmp_path / "k.safetensors", "kohya"))
    assert keys == set(t) | {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"}
    assert meta["ss_base_model_version"] == "sd3" and "v3" in meta["modelspec.architecture"]


def test_wan_i2v_image_keys_and_xlabs_spelling(tmp_path):
    t = {f"diffusion_model.blocks.0.cross_attn.k_img.lora_{s}.weight": v for s, v in
         (("A", randn(2, H, seed=1)), ("B", randn(H, 2, seed=2)))}
    a = lorakit.load(write_st(tmp_path / "wan.safetensors", t))
    assert adapter_family(a) is WAN
    assert list(to_naming(a, WAN, "diffusers").modules) == ["transformer.blocks.0.attn2.add_k_proj"]
    x = {f"double_blocks.0.processor.qkv_lora2.{s}.weight": v for s, v in
         (("down", randn(2, H, seed=3)), ("up", randn(3 * H, 2, seed=4)))}
    b = lorakit.load(write_st(tmp_path / "x.safetensors", x))
    assert b.source_format == "xlabs" and b.modules["transformer.double_blocks.0.processor"
                                                    ".qkv_lora2"].scale == 1.0
    names = sorted(to_naming(b, FLUX1, "diffusers").modules)
    assert names == [f"transformer.transformer_blocks.0.attn.add_{c}_proj" for c in "kqv"]


# ------------------------------------------------------------------------------- coverage

def test_real_flux_aitoolkit_file():
    """Deliver 6: the ai-toolkit Flux.1 file (4 of 38 single blocks, proj_out only)."""
    src = require_real("flux1_aitoolkit_leighwoods")
    a = lorakit.load(src)
    assert adapter_family(a) is FLUX1 and a.layout == "aitoolkit"  # not SD1.5, whatever the
    line = coverage_line(coverage(a, FLUX1))                       # metadata says
    assert line.startswith("double blocks 0/19, single blocks 4/38 (proj_out only), "
                           "text encoder none")
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(src), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "flux1" and info["coverage_line"] == line


def test_sd_text_encoder_coverage_counts_the_released_encoder(tmp_path):
    """SD 1.x's CLIP-L has 12 text-encoder layers, SD 2.x's OpenCLIP-H 23: a file is counted
    against the encoder that holds its highest layer (the real SD 1.x LoKr file: see
    test_real_next.py)."""
    from lorakit.formats.families.sd import SD15

    def te_file(layers, name):
        t = {}
        for i in layers:
            stem = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
            t[f"{stem}.lora_down.weight"] = randn(2, 8, seed=i)
            t[f"{stem}.lora_up.weight"] = randn(8, 2, seed=i + 50)
        t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = randn(2, 8)
        t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = randn(8, 2)
        return lorakit.load(write_st(tmp_path / name, t))

    sd1 = coverage_line(coverage(te_file(range(12), "sd1.safetensors"), SD15))
    sd2 = coverage_line(coverage(te_file([0, 22], "sd2.safetensors"), SD15))
    assert "text encoder layers 12/12" in sd1, sd1
    assert "text encoder layers 2/23" in sd2, sd2


def test_real_flux_file_through_every_flux_layout(tmp_path):
    src = require_real("flux1_aitoolkit_leighwoods")
    a = lorakit.load(src)
    for layout in FLUX1.layouts:
        if layout in ("xlabs", "peft", "bflcontrol"):  # bflcontrol: control LoRAs only
            continue
        out = lorakit.save(a, tmp_path / f"{layout}.safetensors", layout)
        b = to_naming(lorakit.load(out), FLUX1, "diffusers")
        assert sorted(b.modules) == sorted(a.modules), layout
        for k, m in b.modules.items():  # fp16 factors, exact copies (ai-toolkit: scale 1)
            ref = a.modules[k]
            assert torch.equal(m.up, ref.up) and torch.equal(m.down, ref.down), (layout, k)
            assert m.scale == ref.scale == 1.0
    keys, _ = read_keys(tmp_path / "kohya.safetensors")
    assert "lora_unet_single_blocks_7_linear2.lora_down.weight" in keys


# --------------------------------------------------------------------------- unknown keys

LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "diffusers": ({**{f"unet.mid_block.attentions.0.proj_in.lora_{s}.weight": randn(2, 2)
                      for s in "AB"}}, "unet.mid_block.attentions.0.proj_in.lora_Z.weight"),
    "kohya": (kohya("lora_unet_mid_block_attentions_0_proj_in", 2, 2, 2, 1),
              "lora_unet_mid_block_attentions_0_proj_in.hada_zz"),
    "kohya-flux": (kohya("lora_unet_double_blocks_0_img_attn_qkv", 2, 2, 6, 1),
                   "lora_unet_double_blocks_0_img_attn_qkv.scale_weight"),
    "bfl": ({f"diffusion_model.double_blocks.0.img_mlp.0.lora_{s}.weight": randn(2, 2)
             for s in "AB"}, "diffusion_model.double_blocks.0.img_mlp.0.scale"),
    "xlabs": ({f"double_blocks.0.processor.proj_lora1.{s}.weight": randn(2, 2)
               for s in ("down", "up")}, "double_blocks.0.processor.proj_lora1.mid.weight"),
    "aitoolkit": ({f"transformer.single_transformer_blocks.7.proj_out.lora_{s}.weight":
                   randn(2, 2) for s in "AB"}, "transformer.single_transformer_blocks.7.x"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    meta = {"software": '{"name": "ai-toolkit"}'} if layout == "aitoolkit" else None
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors, meta))
    path = write_st(tmp_path / "bad.safetensors", {**tensors, bad: randn(2, 2)}, meta)
    with pytest.raises(UnknownLayoutError) as info:
        lorakit.load(path)
    assert info.value.key == bad and bad in str(info.value) and "--ignore-unknown" in str(
        info.value)
    res = CliRunner().invoke(cli, ["inspect", str(path), "--ignore-unknown", "--no-spectra"])
    assert res.exit_code == 0 and f"ignored 1 unknown key(s): {bad}" in res.output, res.output
    a = lorakit.load(path, ignore_unknown=True)
    assert sorted(a.modules) == sorted(clean.modules)


@pytest.mark.parametrize("key", [
    "transformer.transformer_blocks.0.attn.to_zz",  # a layer Flux.1 does not have
    "transformer.single_transformer_blocks.38.proj_out",  # block 38 of 0..37
])
def test_module_the_family_does_not_have(key, tmp_path):
    t = {f"transformer.single_transformer_blocks.1.proj_out.lora_{s}.weight": randn(2, 2)
         for s in "AB"}
    t.update({f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"})
    with pytest.raises(UnknownLayoutError, match="Flux.1 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key
    out = tmp_path / "o.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "f.safetensors"), "--to", "kohya",
                                   "-o", str(out), "--ignore-unknown"])
    assert res.exit_code == 0 and key in res.output, res.output
    assert read_keys(out)[0] == {f"lora_unet_single_blocks_1_linear2.{s}" for s in
                                 ("lora_down.weight", "lora_up.weight", "alpha")}


# ------------------------------------------------------------------------- kohya metadata

def test_kohya_metadata_dynamic_sdxl_prefixes_and_modelspec(tmp_path):
    """Defect 3: mixed ranks write ``Dynamic``; SDXL text encoders ``lora_te1_``/``lora_te2_``
    from a diffusers SDXL file; ``ss_base_model_version``, ``ss_v2`` and ``modelspec.*``."""
    mods = {"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q":
            LoraModule(randn(4, 8), randn(8, 4, seed=1), alpha=4.0),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            LoraModule(randn(6, 8), randn(8, 6, seed=2), alpha=6.0)}
    d = lorakit.save(Adapter(modules=mods, component_prefix=True), tmp_path / "d.safetensors",
                     "diffusers")
    k = lorakit.save(lorakit.convert(lorakit.load(d), "kohya"), tmp_path / "k.safetensors",
                     "kohya")
    keys, meta = read_keys(k)
    assert any(n.startswith("lora_te1_") for n in keys) and not any(
        n.startswith("lora_te_") for n in keys)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.implementation"]
    same = {"unet.mid_block.attentions.0.proj_in": LoraModule(randn(4, 8), randn(8, 4), 4.0)}
    _, meta1 = read_keys(lorakit.save(Adapter(modules=same, component_prefix=True),
                                      tmp_path / "one.safetensors", "kohya"))
    assert meta1["ss_network_dim"] == "4" and meta1["ss_network_alpha"] == "4"


def test_text_encoder_patterns_match_both_transformers_namings(tmp_path):
    """Defect 2: ``rank_pattern`` keys match ``text_model.encoder.layers.N`` and
    ``encoder.layers.N`` by PEFT's rule ``(.*\\.)?(pattern)$``."""
    import re

    mods = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            LoraModule(randn(2, 8), randn(8, 2), 2.0),
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj":
            LoraModule(randn(4, 8), randn(8, 4), 4.0),
            "text_encoder.text_model.encoder.layers.1.self_attn.k_proj":
            LoraModule(randn(4, 8), randn(8, 4), 4.0)}
    out = lorakit.save(Adapter(modules=mods, component_prefix=True), tmp_path / "t.safetensors",
                       "diffusers")
    cfg = json.loads(read_keys(out)[1]["lora_adapter_metadata"])
    pattern = cfg["text_encoder.rank_pattern"]
    for name in ("text_model.encoder.layers.0.self_attn.q_proj",
                 "encoder.layers.0.self_attn.q_proj"):
        hits = [p for p in pattern if re.match(rf"(.*\.)?({p})$", name)]
        assert hits and pattern[hits[0]] == 2, (name, pattern)
    assert lorakit.load(out).modules[next(iter(mods))].rank == 2


# ------------------------------------------------------------------------------ structure

def test_formats_never_import_sources_or_hub():
    """Deliver 7: the load path runs one way: sources/hub -> formats, never back."""
    root = Path(lorakit.__file__).parent / "formats"
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in ("lorakit.sources", "lorakit.hub"), file
            if isinstance(node, ast.Import):
                assert not any(a.name in ("lorakit.sources", "lorakit.hub") for a in node.names)


def test_layout_table_lists_every_family():
    from lorakit.formats.registry import table

    rows = table()
    assert rows[0][:4] == ["family", "peft", "diffusers", "aitoolkit"]
    flux = next(r for r in rows if r[0] == "Flux.1")
    assert flux.count("yes") == 9  # with falkontext and bflcontrol


def test_align_brings_two_namings_together(tmp_path):
    """A kohya Flux file (fused qkv) and a diffusers one (split) align on diffusers keys, so a
    merge sums the same layers; the sum equals the sum of the stacked updates."""
    from lorakit.formats.rename import align

    k = lorakit.load(write_st(tmp_path / "k.safetensors",
                              kohya("lora_unet_double_blocks_0_img_attn_qkv", 2, H, 3 * H, 1, 2)))
    d = lorakit.load(write_st(tmp_path / "d.safetensors", {
        f"transformer.transformer_blocks.0.attn.to_k.lora_{s}.weight": randn(*shape, seed=5)
        for s, shape in (("A", (2, H)), ("B", (H, 2)))}))
    a, b = align([k, d])
    assert "transformer.transformer_blocks.0.attn.to_k" in a.modules and sorted(b.modules) == \
        sorted(d.modules)
    merged = lorakit.merge([a, b], "linear")
    got = lora_delta(merged.modules["transformer.transformer_blocks.0.attn.to_k"])
    up = k.modules["transformer.double_blocks.0.img_attn.qkv"]
    want = np_delta(up.up[H:2 * H], up.down, 1.0) + lora_delta(
        d.modules["transformer.transformer_blocks.0.attn.to_k"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_lora_key_in_a_peft_folder(tmp_path):
    """PEFT: tensors without a LoRA role are extras (modules_to_save) by design; a LoRA-like key
    of no role is the named error, and ``--ignore-unknown`` lists it."""
    from tests.formats.helpers import peft_pair, write_peft

    bad = "base_model.model.model.layers.0.q_proj.lora_Z.weight"
    folder = write_peft(tmp_path / "p", {"r": 2, "lora_alpha": 2},
                        {**peft_pair("model.layers.0.q_proj", 2, 4, 4, 1), bad: randn(2, 2)})
    with pytest.raises(UnknownLayoutError) as info:
        lorakit.load(folder)
    assert info.value.key == bad
    res = CliRunner().invoke(cli, ["inspect", str(folder), "--ignore-unknown", "--no-spectra"])
    assert res.exit_code == 0 and f"ignored 1 unknown key(s): {bad}" in res.output, res.output
