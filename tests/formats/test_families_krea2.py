"""Krea 2 (diffusers ``Krea2Transformer2DModel``): spec-exact files of the original names, built by
hand: the reference trainer's / ComfyUI's (``diffusion_model.blocks.0.attn.wq.lora_A.weight``) and
ai-toolkit's PEFT state dict (``base_model.model.blocks.0.attn.wq.lora_A.weight``, no
adapter_config.json), the schemes diffusers' ``_convert_non_diffusers_krea2_lora_to_diffusers``
reads, and diffusers files; every name mapped exactly against numpy (nothing is fused), detection
against the families whose names Krea 2 shares, coverage, unknown keys and modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.cli import cli
from lorakit.errors import ConfigMismatchError, UnknownLayoutError
from lorakit.formats import adapter_family
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import HUNYUAN_VIDEO, KREA2, WAN, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import assert_unknown_key_named, randn, read_keys, write_st
from tests.formats.test_families import lora_delta, np_delta

# original name -> diffusers name, one of each kind
NAMES = {"blocks.27.attn.wq": "transformer_blocks.27.attn.to_q",
         "blocks.0.attn.wk": "transformer_blocks.0.attn.to_k",
         "blocks.0.attn.wv": "transformer_blocks.0.attn.to_v",
         "blocks.0.attn.wo": "transformer_blocks.0.attn.to_out.0",
         "blocks.0.attn.gate": "transformer_blocks.0.attn.to_gate",
         "blocks.1.mlp.gate": "transformer_blocks.1.ff.gate",
         "blocks.1.mlp.up": "transformer_blocks.1.ff.up",
         "blocks.1.mlp.down": "transformer_blocks.1.ff.down",
         "txtfusion.layerwise_blocks.1.attn.wq": "text_fusion.layerwise_blocks.1.attn.to_q",
         "txtfusion.refiner_blocks.0.mlp.down": "text_fusion.refiner_blocks.0.ff.down",
         "txtfusion.refiner_blocks.1.attn.gate": "text_fusion.refiner_blocks.1.attn.to_gate",
         "txtfusion.projector": "text_fusion.projector", "first": "img_in",
         "tmlp.0": "time_embed.linear_1", "tmlp.2": "time_embed.linear_2",
         "tproj.1": "time_mod_proj", "txtmlp.1": "txt_in.linear_1", "txtmlp.3": "txt_in.linear_2",
         "last.linear": "final_layer.linear"}


def original(stem, r, din, dout, seed, prefix="diffusion_model.", alpha=None, kohya=False):
    down, up = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    t = {f"{prefix}{stem}.{down}.weight": randn(r, din, seed=seed),
         f"{prefix}{stem}.{up}.weight": randn(dout, r, seed=seed + 1)}
    if alpha is not None:
        t[f"{prefix}{stem}.alpha"] = torch.tensor(float(alpha))
    return t


def _all(prefix, **kw):
    t = {}
    for n, stem in enumerate(NAMES):
        t.update(original(stem, 2, 8 + n, 4 + n, 2 * n, prefix=prefix, **kw))
    return t


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
def test_original_names_map_exactly(prefix, tmp_path):
    t = _all(prefix)
    a = lorakit.load(write_st(tmp_path / "o.safetensors", t))
    assert a.source_format == "bfl" and adapter_family(a) is KREA2
    assert a.layout == ("aitoolkit" if prefix.startswith("base") else "bfl")
    d = to_naming(a, KREA2, "diffusers").modules
    assert len(d) == len(NAMES)
    for native, ours in NAMES.items():  # no alpha: scale 1, as diffusers reads it
        q = f"{prefix}{native}"
        np.testing.assert_allclose(lora_delta(d[f"transformer.{ours}"]), np_delta(
            t[f"{q}.lora_B.weight"], t[f"{q}.lora_A.weight"], 1.0), rtol=1e-12)
    assert coverage_line(coverage(a, KREA2)) == \
        "blocks 3/28, text fusion layerwise blocks 1/2 (attn.to_q only), " \
        "text fusion refiner blocks 2/2 (attn.to_gate, ff.down only)"
    out = lorakit.save(a, tmp_path / "o2.safetensors")  # bfl: lora_A/lora_B, no alphas
    keys, meta = read_keys(out)
    assert keys == {k.replace(prefix, "diffusion_model.") for k in t}
    assert meta["lorakit.family"] == "krea2"


def test_comfyui_alphas_and_lora_down_are_read_and_folded_when_written(tmp_path):
    t = {**original("blocks.3.attn.wq", 4, 12, 12, 1, alpha=2, kohya=True),
         **original("tproj.1", 2, 12, 72, 3, alpha=8, kohya=True)}
    a = lorakit.load(write_st(tmp_path / "k.safetensors", t))
    assert adapter_family(a) is KREA2
    q = a.modules["transformer.blocks.3.attn.wq"]
    assert q.scale == 0.5
    out = lorakit.save(a, tmp_path / "k2.safetensors", "bfl")
    keys, _ = read_keys(out)
    assert keys == {"diffusion_model.blocks.3.attn.wq.lora_A.weight",
                    "diffusion_model.blocks.3.attn.wq.lora_B.weight",
                    "diffusion_model.tproj.1.lora_A.weight", "diffusion_model.tproj.1.lora_B.weight"}
    back = lorakit.load(out).modules
    for stem, scale in (("blocks.3.attn.wq", 0.5), ("tproj.1", 4.0)):
        p = f"diffusion_model.{stem}"
        assert back[f"transformer.{stem}"].scale == 1.0  # folded into lora_B
        np.testing.assert_allclose(lora_delta(back[f"transformer.{stem}"]), np_delta(
            t[f"{p}.lora_up.weight"], t[f"{p}.lora_down.weight"], scale), rtol=1e-6)


def test_diffusers_file_writes_original_names(tmp_path):
    mods = {f"transformer.{ours}": LoraModule(randn(2, 6, seed=n), randn(5, 2, seed=n + 50),
                                               alpha=3.0) for n, ours in enumerate(NAMES.values())}
    src = Adapter(modules=mods, component_prefix=True)
    assert adapter_family(src) is KREA2
    out = lorakit.save(src, tmp_path / "c.safetensors", "bfl")
    back = lorakit.load(out)
    for native, ours in NAMES.items():
        m = back.modules[f"transformer.{native}"]
        np.testing.assert_allclose(lora_delta(m), lora_delta(mods[f"transformer.{ours}"]),
                                   rtol=1e-5, atol=1e-6)  # scale 1.5 folded into float32 B
    d = lorakit.save(back, tmp_path / "d.safetensors", "diffusers")
    assert sorted(lorakit.load(d).modules) == sorted(mods)


def test_detection(tmp_path):
    for ours in NAMES.values():
        if ours.startswith("transformer_blocks.0.attn.to_") and not ours.endswith("gate") \
                or ours in ("img_in", "final_layer.linear", "transformer_blocks.27.attn.to_q"):
            continue  # the attention layers Flux.1 and SD3 spell alike, Flux.1's img_in
        assert detect_family([f"transformer.{ours}"]) is KREA2, ours
    for native in NAMES:
        assert detect_family([f"transformer.{native}"]) is KREA2, native
    shared = ["transformer.transformer_blocks.0.attn.to_k"]
    assert detect_family(shared) is None  # Flux.1's or SD3's too: undecided
    assert detect_family(shared, {"lorakit.family": "krea2"}) is KREA2
    assert detect_family(shared, {"modelspec.architecture": "krea-2/lora"}) is KREA2
    assert detect_family(shared, shapes={shared[0]: (1536, 6144)}) is KREA2  # 12 of 48 heads
    assert detect_family(shared, shapes={shared[0]: (3072, 3072)}) is None  # no grouped query
    q = "transformer.transformer_blocks.0.attn.to_q"
    assert detect_family([q, *shared], shapes={q: (3072, 3072), shared[0]: (3072, 3072)}) \
        .name == "flux1"
    # HunyuanVideo's txt_in. and Wan's blocks. stay theirs
    assert detect_family(["transformer.txt_in.individual_token_refiner.blocks.0.self_attn_qkv"]) \
        is HUNYUAN_VIDEO
    assert detect_family(["transformer.txt_in.linear_1"]) is KREA2
    assert detect_family(["transformer.blocks.0.self_attn.q"]) is WAN
    assert detect_family(["transformer.blocks.0.attn1.to_q"]) is WAN
    # a Flux.1 Krea [dev] file's metadata does not make it Krea 2
    assert detect_family(shared, {"modelspec.architecture": "flux-1-krea-dev/lora"}).name == \
        "flux1"


def test_peft_state_dict_of_another_model_without_config_is_still_refused(tmp_path):
    t = {f"base_model.model.model.layers.0.self_attn.q_proj.lora_{s}.weight": randn(2, 2)
         for s in "AB"}
    with pytest.raises(ConfigMismatchError, match="without adapter_config.json"):
        lorakit.load(write_st(tmp_path / "p.safetensors", t))


def test_inspect_coverage(tmp_path):
    t = {}
    for i in range(28):
        t.update(original(f"blocks.{i}.attn.gate", 2, 8, 8, i))
    path = write_st(tmp_path / "g.safetensors", t)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json", "--no-spectra"])
                      .output)
    assert info["family"] == "krea2"
    assert info["coverage_line"] == "blocks 28/28 (attn.to_gate only), text fusion layerwise " \
                                    "blocks 0/2, text fusion refiner blocks 0/2"


LAYOUT_FILES = {  # layout -> (tensors, an unknown key of that spelling)
    "bfl": (original("blocks.0.mlp.up", 2, 8, 8, 1),
            "diffusion_model.blocks.0.mlp.up.lora_M.weight"),
    "aitoolkit": (original("txtfusion.projector", 2, 3, 1, 1, prefix="base_model.model."),
                  "base_model.model.txtfusion.projector.lora_Q.weight"),
    "diffusers": ({f"transformer.time_mod_proj.lora_{s}.weight": randn(2, 2) for s in "AB"},
                  "transformer.time_mod_proj.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is KREA2
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


@pytest.mark.parametrize("key", [
    "transformer.transformer_blocks.28.attn.to_q",  # block 28 of 0..27
    "transformer.text_fusion.refiner_blocks.2.ff.up",  # refiner block 2 of 0..1
    "transformer.transformer_blocks.0.attn.add_q_proj",  # Flux.1's, not Krea 2's
    "transformer.blocks.0.attn.wx",  # an original name Krea 2 does not have
    "transformer.txtfusion.layerwise_blocks.2.mlp.gate",  # layerwise block 2 of 0..1
])
def test_module_krea2_does_not_have(key, tmp_path):
    t = {**{f"transformer.time_mod_proj.lora_{s}.weight": randn(2, 2) for s in "AB"},
         **{f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="Krea 2 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t), family="krea2")
    assert info.value.key == key


def test_peft_folder_round_trip(tmp_path):
    """``convert --to peft`` of an ai-toolkit file: the transformer's PEFT folder (diffusers
    names, its class in ``auto_mapping``) reads back with the same updates."""
    t = _all("base_model.model.")
    a = lorakit.load(write_st(tmp_path / "a.safetensors", t))
    out = lorakit.save(lorakit.convert(a, "peft"), tmp_path / "peft", "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["auto_mapping"] == {"base_model_class": "Krea2Transformer2DModel"}
    back = lorakit.load(out)
    assert sorted(back.modules) == sorted(NAMES.values())
    for native, ours in NAMES.items():
        np.testing.assert_allclose(lora_delta(back.modules[ours]),
                                   lora_delta(a.modules[f"transformer.{native}"]), rtol=1e-6)
