"""LTX-2 (diffusers ``LTX2VideoTransformer3DModel`` + ``LTX2TextConnectors``): spec-exact ComfyUI /
original-names files (``diffusion_model.`` + the original checkpoint's names, the connectors under
``text_embedding_projection.``, the scheme diffusers' ``_convert_non_diffusers_ltx2_lora_to_diffusers``
reads) and diffusers files, built by hand; every rename checked on the full update against numpy
(LTX-2 fuses no layer: each original layer is one diffusers layer); detection against LTX-Video
(which shares the video stream's names), coverage, unknown keys and modules."""

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
from lorakit.formats import adapter_family, convert
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import LTX2, LTX_VIDEO, detect_family
from lorakit.formats.rename import align, to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import lora_delta, np_delta

V, A = 16, 8  # video and audio widths


def comfy(stem, r, din, dout, seed, alpha=None, prefix="diffusion_model."):
    t = {f"{prefix}{stem}.lora_down.weight": randn(r, din, seed=seed),
         f"{prefix}{stem}.lora_up.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"{prefix}{stem}.alpha"] = torch.tensor(float(alpha))
    return t


TEP = "text_embedding_projection."
# original name -> (diffusers key, in, out)
ORIGINAL = {
    "diffusion_model.patchify_proj": ("transformer.proj_in", 4, V),
    "diffusion_model.audio_patchify_proj": ("transformer.audio_proj_in", 4, A),
    "diffusion_model.adaln_single.linear": ("transformer.time_embed.linear", V, 6 * V),
    "diffusion_model.audio_adaln_single.emb.timestep_embedder.linear_1":
        ("transformer.audio_time_embed.emb.timestep_embedder.linear_1", 256, A),
    "diffusion_model.av_ca_video_scale_shift_adaln_single.linear":
        ("transformer.av_cross_attn_video_scale_shift.linear", V, 4 * V),
    "diffusion_model.av_ca_audio_scale_shift_adaln_single.emb.timestep_embedder.linear_2":
        ("transformer.av_cross_attn_audio_scale_shift.emb.timestep_embedder.linear_2", A, A),
    "diffusion_model.av_ca_a2v_gate_adaln_single.linear":
        ("transformer.av_cross_attn_video_a2v_gate.linear", V, V),
    "diffusion_model.av_ca_v2a_gate_adaln_single.linear":
        ("transformer.av_cross_attn_audio_v2a_gate.linear", A, A),
    "diffusion_model.prompt_adaln_single.linear": ("transformer.prompt_adaln.linear", V, 2 * V),
    "diffusion_model.audio_prompt_adaln_single.linear":
        ("transformer.audio_prompt_adaln.linear", A, 2 * A),
    "diffusion_model.caption_projection.linear_1": ("transformer.caption_projection.linear_1",
                                                    16, V),
    "diffusion_model.audio_proj_out": ("transformer.audio_proj_out", A, 4),
    "diffusion_model.transformer_blocks.47.audio_to_video_attn.to_k":
        ("transformer.transformer_blocks.47.audio_to_video_attn.to_k", A, A),
    "diffusion_model.transformer_blocks.47.video_to_audio_attn.to_out.0":
        ("transformer.transformer_blocks.47.video_to_audio_attn.to_out.0", A, A),
    "diffusion_model.transformer_blocks.3.audio_ff.net.0.proj":
        ("transformer.transformer_blocks.3.audio_ff.net.0.proj", A, 4 * A),
    "diffusion_model.transformer_blocks.3.attn2.to_gate_logits":
        ("transformer.transformer_blocks.3.attn2.to_gate_logits", V, 2),
    f"{TEP}aggregate_embed": ("connectors.text_proj_in", 32, 16),
    f"{TEP}video_aggregate_embed": ("connectors.video_text_proj_in", 32, V),
    f"{TEP}audio_connector.transformer_blocks.1.attn1.to_v":
        ("connectors.audio_connector.transformer_blocks.1.attn1.to_v", 16, 16),
}


def _original_file():
    t = {}
    for n, (stem, (_, din, dout)) in enumerate(ORIGINAL.items()):
        prefix, _, rest = stem.partition(".")
        t.update(comfy(rest, 2, din, dout, 2 * n, alpha=3, prefix=prefix + "."))
    return t


def test_comfyui_original_names_map_exactly_and_write_back(tmp_path):
    t = _original_file()
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is LTX2
    assert sorted(a.components()) == ["connectors", "transformer"]
    d = to_naming(a, LTX2, "diffusers").modules
    assert sorted(d) == sorted(v[0] for v in ORIGINAL.values())
    for stem, (ours, _, _) in ORIGINAL.items():
        np.testing.assert_allclose(lora_delta(d[ours]), np_delta(
            t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"], 1.5), rtol=1e-12)
    out = lorakit.save(to_naming(a, LTX2, "diffusers"), tmp_path / "c2.safetensors", "bfl")
    keys, meta = read_keys(out)
    # lora_A/lora_B, scales folded into B (what diffusers' reader takes)
    assert keys == {f"{s}.lora_{x}.weight" for s in ORIGINAL for x in "AB"}
    assert meta["lorakit.family"] == "ltx2"
    back = lorakit.load(out).modules
    for stem in ORIGINAL:
        comp = "connectors" if stem.startswith(TEP) else "transformer"
        m = back[f"{comp}.{stem.partition('.')[2]}"]
        assert m.scale == 1.0
        np.testing.assert_allclose(lora_delta(m), np_delta(
            t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"], 1.5), rtol=1e-6,
            atol=1e-6)  # the scale folded into B in float32


def test_diffusers_and_peft_layouts_round_trip(tmp_path):
    mods = {k: LoraModule(randn(2, din, seed=n), randn(dout, 2, seed=50 + n), alpha=1.0)
            for n, (k, din, dout) in enumerate(ORIGINAL.values())}
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is LTX2
    out = lorakit.save(src, tmp_path / "d.safetensors", "diffusers")
    keys, _ = read_keys(out)
    assert "connectors.text_proj_in.lora_A.weight" in keys
    assert "transformer.time_embed.linear.lora_B.weight" in keys
    back = lorakit.load(out)
    assert sorted(back.modules) == sorted(mods)
    for k, m in mods.items():
        np.testing.assert_allclose(lora_delta(back.modules[k]), lora_delta(m), rtol=1e-12)
    peft = lorakit.save(convert(src, "peft", component="transformer"), tmp_path / "p", "peft")
    p = lorakit.load(peft)
    assert sorted(p.modules) == sorted(k[len("transformer."):] for k in mods
                                       if k.startswith("transformer."))
    assert adapter_family(p) is LTX2


def test_detection_against_ltx_video():
    assert detect_family(["transformer.transformer_blocks.0.audio_attn1.to_q"]) is LTX2
    assert detect_family(["transformer.transformer_blocks.0.video_to_audio_attn.to_k"]) is LTX2
    assert detect_family(["transformer.av_cross_attn_video_a2v_gate.linear"]) is LTX2
    assert detect_family(["transformer.audio_adaln_single.linear"]) is LTX2
    assert detect_family(["connectors.video_connector.transformer_blocks.0.attn1.to_q"]) is LTX2
    assert detect_family(["connectors.aggregate_embed"]) is LTX2
    shared = ["transformer.transformer_blocks.0.attn1.to_q", "transformer.caption_projection."
              "linear_1", "transformer.time_embed.emb.timestep_embedder.linear_1"]
    assert detect_family(shared) is LTX_VIDEO  # the video stream's names: LTX-Video's
    assert detect_family(shared + ["transformer.transformer_blocks.0.audio_ff.net.2"]) is LTX2
    assert detect_family(shared, {"modelspec.architecture": "ltx-2/lora"}) is LTX2
    assert detect_family(shared, {"lorakit.family": "ltx2"}) is LTX2
    assert detect_family(shared, {"ss_base_model_version": "ltx2"}) is LTX2
    assert detect_family(shared, {"modelspec.architecture": "ltx-video/lora"}) is LTX_VIDEO
    assert detect_family(["transformer.transformer_blocks.0.attn.to_q"]) is not LTX2  # Flux/SD3
    assert detect_family(["model.layers.0.self_attn.q_proj"]) is None


def test_coverage_counts_48_blocks_and_the_connectors(tmp_path):
    t = {}
    for i in range(48):
        for layer in ("attn1.to_q", "audio_to_video_attn.to_q"):
            t.update({f"transformer.transformer_blocks.{i}.{layer}.lora_{s}.weight":
                      randn(2, V, seed=i) if s == "A" else randn(V, 2, seed=i) for s in "AB"})
    t.update({f"connectors.video_connector.transformer_blocks.1.ff.net.2.lora_{s}.weight":
              randn(2, 2) for s in "AB"})
    path = write_st(tmp_path / "d.safetensors", t)
    a = lorakit.load(path)
    assert coverage_line(coverage(a, LTX2)) == \
        "blocks 48/48 (attn1.to_q, audio_to_video_attn.to_q only), connectors: video connector blocks 1/2 " \
        "(ff.net.2 only), audio connector blocks 0/2"
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "ltx2"
    assert info["coverage_line"] == coverage_line(coverage(a, LTX2))
    only = lorakit.load(write_st(tmp_path / "t.safetensors", {
        f"transformer.transformer_blocks.0.{s}.lora_{x}.weight": randn(2, 2)
        for s in ("ff.net.2", "audio_attn2.to_k") for x in "AB"}))
    assert coverage_line(coverage(only, LTX2)) == \
        "blocks 1/48 (audio_attn2.to_k, ff.net.2 only), connectors none"


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (comfy("av_ca_a2v_gate_adaln_single.linear", 2, V, V, 1, alpha=2),
            "diffusion_model.av_ca_a2v_gate_adaln_single.linear.lora_M.weight"),
    "bfl-connectors": (comfy("aggregate_embed", 2, 32, 16, 3, alpha=2, prefix=TEP),
                       f"{TEP}aggregate_embed.lora_mystery.weight"),
    "diffusers": ({f"connectors.audio_connector.transformer_blocks.0.attn1.to_q.lora_{s}.weight":
                   randn(2, 2) for s in "AB"},
                  "connectors.audio_connector.transformer_blocks.0.attn1.to_q.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is LTX2
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.transformer_blocks.48.audio_attn1.to_q",  # block 48 of 0..47
    "transformer.transformer_blocks.0.audio_attn3.to_q",  # no third audio attention
    "connectors.video_connector.transformer_blocks.2.attn1.to_q",  # connector block 2 of 0..1
    "connectors.video_connector.transformer_blocks.0.attn2.to_q",  # connectors self-attend only
    "transformer.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q",  # see below
])
def test_module_ltx2_does_not_have(key, tmp_path):
    """The original checkpoint's connector blocks under ``diffusion_model.`` are no layer of
    the transformer (diffusers sends them there and drops them: test_diffusers_ltx2.py)."""
    t = {**{f"transformer.transformer_blocks.0.audio_ff.net.2.lora_{s}.weight": randn(2, 2)
            for s in "AB"},
         **{f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="LTX-2 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key


def test_ltx_video_file_with_an_audio_layer_is_not_ltx_video():
    """LTX-Video is ruled out by any LTX-2-only name (so an LTX-2 file is never read as
    LTX-Video with its audio layers unknown)."""
    keys = ["transformer.transformer_blocks.0.attn1.to_q", "transformer.audio_proj_in"]
    assert detect_family(keys) is LTX2
    assert not LTX_VIDEO.knows("transformer", "audio_proj_in")


def test_comfyui_and_diffusers_files_align_for_merges(tmp_path):
    """A ComfyUI file (``patchify_proj``, ``aggregate_embed`` among block names both spell alike)
    and a diffusers file of the same layers share their keys once aligned (as ``merge`` does)."""
    layers = {"diffusion_model.patchify_proj": ("transformer.proj_in", 4, V),
              "diffusion_model.transformer_blocks.0.attn1.to_q":
                  ("transformer.transformer_blocks.0.attn1.to_q", V, V),
              "diffusion_model.transformer_blocks.0.audio_attn1.to_q":
                  ("transformer.transformer_blocks.0.audio_attn1.to_q", A, A),
              f"{TEP}aggregate_embed": ("connectors.text_proj_in", 32, 16)}
    t, d = {}, {}
    for n, (stem, (ours, din, dout)) in enumerate(layers.items()):
        prefix, _, rest = stem.partition(".")
        t.update(comfy(rest, 2, din, dout, n, alpha=2, prefix=prefix + "."))
        d.update({f"{ours}.lora_A.weight": randn(2, din, seed=20 + n),
                  f"{ours}.lora_B.weight": randn(dout, 2, seed=40 + n)})
    c = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    f = lorakit.load(write_st(tmp_path / "d.safetensors", d))
    a, b = align([c, f])
    assert sorted(a.modules) == sorted(b.modules) == sorted(v[0] for v in layers.values())
    same = align([c, c])
    assert sorted(same[0].modules) == sorted(c.modules)  # one naming: kept as read
