"""HiDream-I1 (issue 16, further families): its checkpoint uses diffusers' names, so ComfyUI files
are ``diffusion_model.`` + those names (``lora_down``/``lora_up`` + ``.alpha`` or
``lora_A``/``lora_B``), diffusers files ``transformer.`` + them. Spec-exact files built by hand,
checked against numpy; detection against the families whose names look alike, coverage of the
double and single stream blocks (mixture-of-experts layers included), unknown keys and modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lorakit
from lorakit.cli import cli
from lorakit.errors import UnknownLayoutError
from lorakit.formats import adapter_family
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import HIDREAM, LTX_VIDEO, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import H, lora_delta, np_delta

DB, SB = "double_stream_blocks", "single_stream_blocks"


def comfy(stem, r, din, dout, seed, alpha=None, ab=False):
    down, up = ("lora_A", "lora_B") if ab else ("lora_down", "lora_up")
    t = {f"diffusion_model.{stem}.{down}.weight": randn(r, din, seed=seed),
         f"diffusion_model.{stem}.{up}.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(alpha))
    return t


def test_comfyui_file_reads_exactly_and_writes_as_diffusers_reads_it(tmp_path):
    t = {**comfy(f"{DB}.15.block.attn1.to_q_t", 4, H, H, 1, alpha=2),
         **comfy(f"{DB}.0.block.ff_i.experts.3.w2", 2, 4 * H, H, 3, alpha=4),
         **comfy(f"{SB}.31.block.ff_i.shared_experts.w1", 2, H, 4 * H, 5, alpha=1),
         **comfy(f"{SB}.0.block.adaLN_modulation.1", 2, H, 6 * H, 7, alpha=2),
         **comfy("caption_projection.48.linear", 2, 16, H, 9, alpha=2)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is HIDREAM
    d = to_naming(a, HIDREAM, "diffusers")
    assert sorted(d.modules) == sorted(f"transformer.{k[len('diffusion_model.'):-len('.alpha')]}"
                                       for k in t if k.endswith(".alpha"))
    for k, m in d.modules.items():
        p = f"diffusion_model.{k[len('transformer.'):]}"
        up, down = t[f"{p}.lora_up.weight"], t[f"{p}.lora_down.weight"]
        np.testing.assert_allclose(lora_delta(m), np_delta(up, down, float(t[f"{p}.alpha"])
                                                           / down.shape[0]), rtol=1e-12)
    assert coverage_line(coverage(a, HIDREAM)) == \
        "double blocks 2/16 (block.attn1.to_q_t, block.ff_i.experts.3.w2 only), single blocks " \
        "2/32 (block.adaLN_modulation.1, block.ff_i.shared_experts.w1 only)"
    out = lorakit.save(a, tmp_path / "ab.safetensors", "bfl")
    keys, meta = read_keys(out)  # lora_A/lora_B, scale folded into B (what diffusers reads)
    assert keys == {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B") for k in t
                    if not k.endswith(".alpha")} and meta["lorakit.family"] == "hidream"
    b = lorakit.load(out)
    for k, m in b.modules.items():
        np.testing.assert_allclose(lora_delta(m), lora_delta(a.modules[k]), rtol=1e-6)
    keys, _ = read_keys(lorakit.save(a, tmp_path / "d.safetensors", "diffusers"))
    assert f"transformer.{DB}.15.block.attn1.to_q_t.lora_A.weight" in keys


def test_detection_does_not_take_or_lose_look_alike_names(tmp_path):
    """HiDream's ``x_embedder.proj`` is HunyuanVideo's name too and ``caption_projection`` is
    LTX-Video's prefix: the blocks decide."""
    assert detect_family([f"transformer.{DB}.0.block.attn1.to_q",
                          "transformer.x_embedder.proj"]) is HIDREAM
    assert detect_family(["transformer.caption_projection.3.linear"]) is HIDREAM
    assert detect_family(["transformer.caption_projection.linear_1",
                          "transformer.transformer_blocks.0.attn1.to_q"]) is LTX_VIDEO
    t = {}
    for i in range(16):
        t.update({f"transformer.{DB}.{i}.block.attn1.to_v.lora_{s}.weight":
                  randn(2, H, seed=i) if s == "A" else randn(H, 2, seed=i) for s in "AB"})
    path = write_st(tmp_path / "d.safetensors", t)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "hidream"
    assert info["coverage_line"] == "double blocks 16/16 (block.attn1.to_v only), single " \
                                    "blocks 0/32"


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (comfy(f"{DB}.0.block.attn1.to_k", 2, 2, 2, 1, alpha=2),
            f"diffusion_model.{DB}.0.block.attn1.to_k.lora_M.weight"),
    "diffusers": ({f"transformer.{SB}.0.block.attn1.to_out.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, f"transformer.{SB}.0.block.attn1.to_out.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is HIDREAM
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    f"transformer.{DB}.16.block.attn1.to_q",  # double block 16 of 0..15
    f"transformer.{SB}.0.block.ff_t.w1",  # single blocks have no text stream
    f"transformer.{DB}.0.block.ff_i.experts.4.w1",  # expert 4 of 0..3
    f"transformer.{DB}.0.block.ff_i.gate",  # the router is no Linear
])
def test_module_hidream_does_not_have(key, tmp_path):
    t = {f"transformer.{DB}.0.block.attn1.to_q.lora_{s}.weight": randn(2, 2) for s in "AB"}
    t.update({f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"})
    with pytest.raises(UnknownLayoutError, match="HiDream-I1 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key
