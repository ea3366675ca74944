"""ACE-Step 1.5 (diffusers ``AceStepTransformer1DModel``): diffusers-named files and the original
repository's PEFT folders (``base_model.model.layers.0.self_attn.q_proj``, the ``peftnative``
layout), detection against LLM PEFT folders that spell the same names, coverage, unknown keys
and modules."""

from __future__ import annotations

import numpy as np
import pytest

import lorakit
from lorakit.adapter import Adapter, LoraModule
from lorakit.errors import OptionError, UnknownLayoutError
from lorakit.formats import adapter_family, convert
from lorakit.formats.coverage import coverage, coverage_line
from lorakit.formats.families import ACESTEP, detect_family
from lorakit.formats.rename import to_naming
from tests.formats.helpers import (
    assert_unknown_key_named,
    peft_pair,
    randn,
    read_config,
    write_peft,
    write_st,
)
from tests.formats.test_families import lora_delta, np_delta

H = 32
_ORIGINAL = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "o_proj"}


def original_folder(tmp_path, names, alpha=4, name="ace"):
    t = {}
    for j, n in enumerate(names):
        t.update(peft_pair(n, 2, H, H, seed=j))
    return write_peft(tmp_path / name, {"r": 2, "lora_alpha": alpha,
                                        "task_type": "FEATURE_EXTRACTION",
                                        "target_modules": ["q_proj", "k_proj", "v_proj",
                                                           "o_proj"]}, t), t


def test_original_peft_folder_reads_and_maps_to_diffusers_names(tmp_path):
    names = ["layers.3.self_attn.q_proj", "layers.3.cross_attn.o_proj",
             "layers.3.mlp.gate_proj", "layers.0.self_attn.v_proj"]
    folder, t = original_folder(tmp_path, names)
    a = lorakit.load(folder)
    assert adapter_family(a) is ACESTEP and a.source_format == "peftnative"
    d = to_naming(a, ACESTEP, "diffusers").modules
    want = {"layers.3.self_attn.to_q": names[0], "layers.3.cross_attn.to_out.0": names[1],
            "layers.3.mlp.gate_proj": names[2], "layers.0.self_attn.to_v": names[3]}
    assert sorted(d) == sorted(want)
    for ours, native in want.items():
        p = f"base_model.model.{native}"
        np.testing.assert_allclose(lora_delta(d[ours]), np_delta(
            t[f"{p}.lora_B.weight"], t[f"{p}.lora_A.weight"], 2.0), rtol=1e-12)
    assert coverage_line(coverage(a, ACESTEP)) == "layers 2/24 (4 layer kinds)"
    # written back as read (the default layout is the one read): the same keys and config
    out = lorakit.save(a, tmp_path / "again")
    back = lorakit.load(out)
    assert sorted(back.modules) == sorted(a.modules)
    assert read_config(out)["task_type"] == "FEATURE_EXTRACTION"
    # to a diffusers file and back to the original naming: the same updates
    dfile = lorakit.save(convert(a, "diffusers"), tmp_path / "d.safetensors", "diffusers")
    da = lorakit.load(dfile)
    assert "transformer.layers.3.cross_attn.to_out.0" in da.modules
    native = lorakit.save(convert(da, "peftnative"), tmp_path / "n", "peft-native")
    n = lorakit.load(native)
    assert sorted(n.modules) == sorted(names)
    for k in names:
        np.testing.assert_allclose(lora_delta(n.modules[k]), lora_delta(a.modules[k]),
                                   rtol=1e-6)
    plain = lorakit.save(convert(da, "peft"), tmp_path / "p", "peft")  # diffusers names
    assert "layers.3.self_attn.to_q" in lorakit.load(plain).modules


def test_llm_peft_folders_stay_without_a_family(tmp_path):
    llm = ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.mlp.up_proj"]
    folder, _ = original_folder(tmp_path, llm, name="llm")
    a = lorakit.load(folder)
    assert adapter_family(a) is None and a.source_format == "peft"
    assert detect_family(["model.layers.0.self_attn.q_proj"]) is None
    # Mllama's cross-attention layers hold no self-attention: not ACE-Step
    assert detect_family(["layers.3.cross_attn.q_proj", "layers.0.self_attn.q_proj"],
                         component_prefix=False) is None
    assert detect_family(["layers.3.cross_attn.q_proj", "layers.3.self_attn.q_proj"],
                         component_prefix=False) is ACESTEP
    # ... unless the user or metadata says ACE-Step
    a = lorakit.load(folder, family="acestep")
    assert a.source_format == "peftnative"
    assert detect_family(llm, {"lorakit.family": "acestep"}, component_prefix=False) is ACESTEP
    with pytest.raises(OptionError, match="needs a model family"):
        lorakit.save(lorakit.load(folder), tmp_path / "x", "peftnative")


def test_diffusers_names_detect_and_cover(tmp_path):
    assert detect_family(["transformer.layers.0.cross_attn.to_k"]) is ACESTEP
    assert detect_family(["transformer.time_embed_r.time_proj"]) is ACESTEP
    assert detect_family(["transformer.condition_embedder"]) is ACESTEP
    mods = {f"transformer.layers.{i}.self_attn.to_q":
            LoraModule(randn(2, H, seed=i), randn(H, 2, seed=i + 50), alpha=2.0)
            for i in range(24)}
    a = Adapter(modules=mods, component_prefix=True)
    assert coverage_line(coverage(a, ACESTEP)) == "layers 24/24 (self_attn.to_q only)"


LAYOUT_FILES = {
    "diffusers": ({f"transformer.layers.0.cross_attn.to_q.lora_{s}.weight": randn(2, 2)
                   for s in "AB"}, "transformer.layers.0.cross_attn.to_q.lora_Z.weight"),
}


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_unknown_key_is_named_and_ignore_unknown_lists_it(layout, tmp_path):
    tensors, bad = LAYOUT_FILES[layout]
    clean = lorakit.load(write_st(tmp_path / "ok.safetensors", tensors))
    assert adapter_family(clean) is ACESTEP
    assert_unknown_key_named(tmp_path, tensors, bad, clean)


def test_unknown_key_of_the_original_peft_folder_is_named(tmp_path):
    names = ["layers.0.self_attn.q_proj", "layers.0.cross_attn.q_proj"]
    folder, t = original_folder(tmp_path, names)
    t["base_model.model.layers.0.self_attn.q_proj.lora_Q.weight"] = randn(2, 2)
    write_peft(folder, {"r": 2, "lora_alpha": 4}, t)
    with pytest.raises(UnknownLayoutError) as info:
        lorakit.load(folder)
    assert "lora_Q" in str(info.value)
    a = lorakit.load(folder, ignore_unknown=True)
    assert sorted(a.modules) == sorted(names)


@pytest.mark.parametrize("key", [
    "transformer.layers.24.self_attn.to_q",  # layer 24 of 0..23
    "transformer.layers.0.mlp.fc1",  # an MLP layer ACE-Step does not have
    "transformer.time_embed.linear_3",
])
def test_module_acestep_does_not_have(key, tmp_path):
    t = {**{f"transformer.layers.0.self_attn.to_k.lora_{s}.weight": randn(2, 2) for s in "AB"},
         **{f"{key}.lora_{s}.weight": randn(2, 2) for s in "AB"}}
    with pytest.raises(UnknownLayoutError, match="ACE-Step 1.5 does not have") as info:
        lorakit.load(write_st(tmp_path / "f.safetensors", t))
    assert info.value.key == key


def test_a_native_layer_beyond_the_count_is_an_error(tmp_path):
    folder, _ = original_folder(tmp_path, ["layers.30.self_attn.q_proj",
                                           "layers.30.cross_attn.q_proj"])
    with pytest.raises(UnknownLayoutError, match="ACE-Step 1.5 does not have"):
        lorakit.load(folder)
