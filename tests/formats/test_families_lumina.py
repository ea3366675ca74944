"""Lumina-Image 2.0 (issue 16, further families): spec-exact ComfyUI / original-names files
(``diffusion_model.layers.0.attention.qkv.lora_A.weight``, the scheme diffusers'
``_convert_non_diffusers_lumina2_lora_to_diffusers`` reads) and diffusers files, built by hand;
the fused qkv (rows 3 : 1 : 1) split and fused exactly against numpy; detection, coverage,
unknown keys and modules."""

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
from lorakit.formats.families import LUMINA2, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import lora_delta, np_delta

DIM, KV = 24, 8  # hidden 24 = 3 query heads of 8, one key/value head: Lumina's 3 : 1 : 1


def comfy(stem, r, din, dout, seed, alpha=None):
    t = {f"diffusion_model.{stem}.lora_A.weight": randn(r, din, seed=seed),
         f"diffusion_model.{stem}.lora_B.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(alpha))
    return t


def test_comfyui_qkv_splits_3_1_1_and_names_map(tmp_path):
    t = {**comfy("layers.25.attention.qkv", 4, DIM, DIM + 2 * KV, 1, alpha=2),
         **comfy("noise_refiner.1.attention.qkv", 2, DIM, DIM + 2 * KV, 3),
         **comfy("context_refiner.0.feed_forward.w3", 2, DIM, 64, 5),
         **comfy("layers.0.adaLN_modulation.1", 2, DIM, 4 * DIM, 7),
         **comfy("layers.0.attention.out", 2, DIM, DIM, 9),
         **comfy("t_embedder.mlp.0", 2, 256, DIM, 11), **comfy("cap_embedder.1", 2, 16, DIM, 13),
         **comfy("final_layer.linear", 2, DIM, 16, 15)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is LUMINA2
    d = to_naming(a, LUMINA2, "diffusers").modules
    p = "diffusion_model.layers.25.attention.qkv"
    up, down = t[f"{p}.lora_B.weight"], t[f"{p}.lora_A.weight"]
    for name, (lo, hi) in {"to_q": (0, DIM), "to_k": (DIM, DIM + KV),
                           "to_v": (DIM + KV, DIM + 2 * KV)}.items():
        np.testing.assert_allclose(lora_delta(d[f"transformer.layers.25.attn.{name}"]),
                                   np_delta(up[lo:hi], down, 0.5), rtol=1e-12)
    assert d["transformer.noise_refiner.1.attn.to_v"].up.shape == (KV, 2)
    want = {"context_refiner.0.feed_forward.linear_3": "context_refiner.0.feed_forward.w3",
            "layers.0.norm1.linear": "layers.0.adaLN_modulation.1",
            "layers.0.attn.to_out.0": "layers.0.attention.out",
            "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_caption_embed.caption_embedder.1": "cap_embedder.1",
            "norm_out.linear_2": "final_layer.linear"}
    for ours, native in want.items():
        p = f"diffusion_model.{native}"
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{p}.lora_B.weight"], t[f"{p}.lora_A.weight"], 1.0), rtol=1e-12)
    assert coverage_line(coverage(a, LUMINA2)) == \
        "layers 2/26 (5 layer kinds), noise refiner blocks 1/2 (attn.to_k, attn.to_q, " \
        "attn.to_v only), context refiner blocks 1/2 (feed_forward.linear_3 only)"
    out = lorakit.save(to_naming(a, LUMINA2, "diffusers"), tmp_path / "c2.safetensors", "bfl")
    keys, meta = read_keys(out)
    assert keys == {k for k in t if not k.endswith(".alpha")}  # lora_A/lora_B, scale folded
    assert meta["lorakit.family"] == "lumina2"
    back = lorakit.load(out).modules["transformer.layers.25.attention.qkv"]
    assert back.rank == 4 and torch.equal(back.down, down)
    np.testing.assert_allclose(lora_delta(back), np_delta(up, down, 0.5), rtol=1e-6)


def test_split_loras_fuse_into_attention_qkv_block_diagonal(tmp_path):
    """diffusers to_q (24 rows), to_k, to_v (8 rows each), ranks 2/3/4 -> ``attention.qkv`` of
    rank 9 whose update is the stacked updates."""
    mods, ref = {}, []
    for j, (name, rows, r, alpha) in enumerate([("to_q", DIM, 2, 4.0), ("to_k", KV, 3, 3.0),
                                                ("to_v", KV, 4, 1.0)]):
        m = LoraModule(randn(r, DIM, seed=10 + j), randn(rows, r, seed=20 + j), alpha=alpha)
        mods[f"transformer.layers.3.attn.{name}"] = m
        ref.append(np_delta(m.up, m.down, alpha / r))
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is LUMINA2
    out = lorakit.save(src, tmp_path / "c.safetensors", "bfl")
    fused = lorakit.load(out).modules["transformer.layers.3.attention.qkv"]
    assert fused.rank == 9 and fused.up.shape == (DIM + 2 * KV, 9)
    np.testing.assert_allclose(lora_delta(fused), np.vstack(ref), rtol=1e-6, atol=1e-6)


def test_detection_and_inspect_coverage(tmp_path):
    """diffusers' own Lumina 2 trainer adapts attention only (``layers.N.attn.to_q``...)."""
    assert detect_family(["transformer.layers.0.attn.to_k"]) is LUMINA2
    assert detect_family(["model.layers.0.self_attn.q_proj"]) is None  # an LLM stays one
    t = {}
    for i in range(26):
        t.update({f"transformer.layers.{i}.attn.to_q.lora_{s}.weight":
                  randn(2, DIM, seed=i) if s == "A" else randn(DIM, 2, seed=i) for s in "AB"})
    path = write_st(tmp_path / "d.safetensors", t)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "lumina2"
    assert info["coverage_line"] == "layers 26/26 (attn.to_q only), noise refiner blocks 0/2, " \
                                    "context refiner blocks 0/2"


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (comfy("layers.0.attention.qkv", 2, DIM, DIM + 2 * KV, 1),
            "diffusion_model.layers.0.attention.qkv.lora_M.weight"),
    "diffusers": ({f"transformer.noise_refiner.0.attn.to_q.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, "transformer.noise_refiner.0.attn.to_q.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is LUMINA2
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.context_refiner.0.adaLN_modulation.1",  # the context refiner is not modulated
    "transformer.layers.26.attention.out",  # layer 26 of 0..25
    "transformer.noise_refiner.2.feed_forward.w1",  # refiner block 2 of 0..1
])
def test_module_lumina2_does_not_have(key, tmp_path):
    t = {**comfy("layers.0.attention.qkv", 2, DIM, DIM + 2 * KV, 1),
         **{f"diffusion_model.{key[len('transformer.'):]}.lora_{s}.weight": randn(2, 2)
            for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="Lumina-Image 2.0 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key
