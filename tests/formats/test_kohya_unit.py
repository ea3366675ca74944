"""kohya / A1111 files on small synthetic adapters, with exact expected values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.errors import UnsupportedVariantError

from .helpers import kohya_pair, randn, read_keys, write_st

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    f = write_st(tmp_path / "a.safetensors", kohya_pair(Q, 4, 8, 8, seed=0))
    a = lorakit.load(f)
    m = a.modules[Q_KEY]
    assert (a.source_format, a.layout) == ("kohya", "kohya")
    assert (m.rank, m.alpha, m.scale) == (4, 4.0, 1.0)
    # written back, the alpha is explicit and equal to r
    out = lorakit.save(a, tmp_path / "b.safetensors")
    t = lorakit.load(out)
    assert t.modules[Q_KEY].alpha == 4.0 and t.modules[Q_KEY].scale == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_alpha_and_factors(tmp_path, dtype):
    f = write_st(tmp_path / "a.safetensors", kohya_pair(Q, 4, 8, 8, seed=0, alpha=8.0, dtype=dtype))
    a = lorakit.load(f)
    m = a.modules[Q_KEY]
    assert m.alpha == 8.0 and m.scale == 2.0 and m.down.dtype == dtype
    out = lorakit.save(a, tmp_path / "b.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as g:
        assert g.get_tensor(f"{Q}.alpha").dtype == dtype  # representable: stored like the factors
        assert torch.equal(g.get_tensor(f"{Q}.lora_down.weight"), m.down)
    b = lorakit.load(out)
    assert torch.equal(b.modules[Q_KEY].up, m.up) and b.modules[Q_KEY].scale == 2.0


@pytest.mark.parametrize("alpha", [0.1, 8 / 3])
def test_alpha_not_representable_in_factor_dtype_stays_exact(tmp_path, alpha):
    m = LoraModule(randn(4, 8, dtype=torch.float16), randn(8, 4, seed=1, dtype=torch.float16),
                   alpha=alpha)
    out = lorakit.save(Adapter(modules={"unet.mid_block.attentions.0.proj_in": m}),
                       tmp_path / "a.safetensors", "kohya")
    b = lorakit.load(out).modules["unet.mid_block.attentions.0.proj_in"]
    assert b.alpha == alpha and b.scale == m.scale


def test_rslora_alpha_becomes_plain_alpha(tmp_path):
    m = LoraModule(randn(16, 8), randn(8, 16, seed=1), alpha=8.0, rslora=True)  # scale 2
    out = lorakit.save(Adapter(modules={"model.layers.0.mlp.up_proj": m}),
                       tmp_path / "a.safetensors", "kohya")
    b = lorakit.load(out).modules["model.layers.0.mlp.up_proj"]
    assert (b.alpha, b.rslora, b.scale) == (32.0, False, 2.0)


def test_conv_lora_round_trip(tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    t = {f"{name}.lora_down.weight": randn(4, 3, 3, 3, seed=1),
         f"{name}.lora_up.weight": randn(5, 4, 1, 1, seed=2),
         f"{name}.alpha": torch.tensor(2.0)}
    a = lorakit.load(write_st(tmp_path / "c.safetensors", t))
    key = "unet.down_blocks.0.resnets.0.conv1"
    m = a.modules[key]
    assert m.kind is ModuleKind.CONV and m.delta_shape == (5, 3, 3, 3) and m.scale == 0.5
    expected = 0.5 * np.einsum("or,rikl->oikl", t[f"{name}.lora_up.weight"][:, :, 0, 0].double(),
                               t[f"{name}.lora_down.weight"].double())
    np.testing.assert_allclose(m.delta(torch.float64).numpy(), expected, rtol=1e-12)
    out = lorakit.save(a, tmp_path / "d.safetensors")
    keys, meta = read_keys(out)
    assert keys == set(t)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4"}
    b = lorakit.load(out).modules[key]
    assert torch.equal(b.down, m.down) and torch.equal(b.up, m.up) and b.alpha == 2.0


def test_dora_scale_round_trip(tmp_path):
    t = kohya_pair(Q, 4, 8, 6, seed=0, alpha=4.0)
    t[f"{Q}.dora_scale"] = torch.linspace(0.1, 0.6, 6).reshape(6, 1)
    a = lorakit.load(write_st(tmp_path / "a.safetensors", t))
    m = a.modules[Q_KEY]
    assert a.is_dora and torch.equal(m.magnitude, t[f"{Q}.dora_scale"])
    out = lorakit.save(a, tmp_path / "b.safetensors")
    keys, _ = read_keys(out)
    assert keys == set(t)
    b = lorakit.load(out).modules[Q_KEY]
    assert torch.equal(b.magnitude, m.magnitude)
    # kohya -> PEFT -> kohya keeps the values
    p = lorakit.save(lorakit.convert(a, "peft"), tmp_path / "p", "peft")
    c = lorakit.load(lorakit.save(lorakit.convert(lorakit.load(p), "kohya"),
                                  tmp_path / "c.safetensors", "kohya"))
    assert torch.equal(c.modules[Q_KEY].magnitude.reshape(-1), m.magnitude.reshape(-1))


def test_sdxl_te1_te2_and_unet_names_round_trip(tmp_path):
    t = {}
    t.update(kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, 8, 8, 1, 4.0))
    t.update(kohya_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1", 4, 8, 16, 2, 2.0))
    t.update(kohya_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_out_0",
                        8, 8, 8, 3, 8.0))
    src = write_st(tmp_path / "sdxl.safetensors", t, {"ss_base_model_version": "sdxl_base_v1-0",
                                                       "ss_output_name": "mine"})
    a = lorakit.load(src)
    assert sorted(a.modules) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
    ]
    assert sorted(a.components()) == ["text_encoder", "text_encoder_2", "unet"]
    assert a.modules["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"].scale == 0.5
    out = lorakit.save(a, tmp_path / "out.safetensors")
    keys, meta = read_keys(out)
    assert keys == set(t)  # identical kohya names, te1/te2 prefixes included
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_output_name"] == "mine"
    # ranks 4, 4, 8: kohya writes Dynamic for mixed ranks (issue 16, defect 3)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "Dynamic"
    assert meta["ss_v2"] == "False" and meta["modelspec.architecture"].startswith("stable-diff")
    b = lorakit.load(out)
    for k, m in a.modules.items():
        assert torch.equal(b.modules[k].down, m.down) and b.modules[k].alpha == m.alpha
    # through diffusers and back to kohya: sd-scripts' SDXL names (SGM UNet blocks), the ones
    # diffusers' kohya reader maps in full; te1/te2 prefixes again
    d = lorakit.save(lorakit.convert(a, "diffusers"), tmp_path / "d.safetensors", "diffusers")
    k2 = lorakit.save(lorakit.convert(lorakit.load(d), "kohya"), tmp_path / "k2.safetensors",
                      "kohya")
    sgm = {k.replace("lora_unet_down_blocks_1_attentions_0_", "lora_unet_input_blocks_4_1_")
           for k in t}
    assert read_keys(k2)[0] == sgm



@pytest.mark.parametrize("meta", [{}, {"ss_base_model_version": "sdxl_base_v1-0"}])
def test_sdxl_te1_only_keeps_its_prefix(tmp_path, meta):
    """An SDXL adapter that trains only the first text encoder is not mistaken for SD1.5's."""
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    t = {**kohya_pair(name, 4, 8, 8, 1, 4.0),
         **kohya_pair("lora_unet_mid_block_attentions_0_proj_in", 4, 8, 8, 2, 4.0)}
    a = lorakit.load(write_st(tmp_path / "te1.safetensors", t, meta))
    assert "text_encoder_2" not in a.components()
    out = lorakit.save(a, tmp_path / "out.safetensors")
    assert read_keys(out)[0] == set(t)  # lora_te1_, not lora_te_
    assert read_keys(lorakit.save(lorakit.load(out), tmp_path / "again.safetensors"))[0] == set(t)
    sd15 = {**kohya_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 4, 8, 8, 1, 4.0)}
    out15 = lorakit.save(lorakit.load(write_st(tmp_path / "sd15.safetensors", sd15)),
                         tmp_path / "out15.safetensors")
    assert read_keys(out15)[0] == set(sd15)  # SD1.5 keeps lora_te_

def test_kohya_like_layout_is_written_back_standard(tmp_path):
    like = {
        "lora_unet_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k_lora_down.weight":
            randn(4, 8, seed=1),
        "lora_unet_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k_lora_up.weight":
            randn(8, 4, seed=2),
    }
    a = lorakit.load(write_st(tmp_path / "like.safetensors", like))
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k"
    assert a.layout == "kohya_like" and list(a.modules) == [key] and a.modules[key].scale == 1.0
    out = lorakit.save(a, tmp_path / "std.safetensors")
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"
    assert read_keys(out)[0] == {f"{name}.lora_down.weight", f"{name}.lora_up.weight",
                                 f"{name}.alpha"}
    b = lorakit.load(out)
    assert b.layout == "kohya" and list(b.modules) == [key]
    assert torch.equal(b.modules[key].down, a.modules[key].down)


def test_llm_kohya_names_have_no_component(tmp_path):
    t = kohya_pair("lora_model_layers_3_self_attn_q_proj", 4, 8, 8, 1, 8.0)
    t.update(kohya_pair("lora_model_layers_3_mlp_gate_proj", 4, 8, 16, 2, 8.0))
    a = lorakit.load(write_st(tmp_path / "llm.safetensors", t))
    assert sorted(a.modules) == ["model.layers.3.mlp.gate_proj", "model.layers.3.self_attn.q_proj"]
    assert a.components() == [] and a.modules["model.layers.3.mlp.gate_proj"].scale == 2.0
    p = lorakit.save(lorakit.convert(a, "peft"), tmp_path / "p", "peft")
    assert sorted(lorakit.load(p).modules) == sorted(a.modules)


# LyCORIS types with no exact LoRA form (LoHa, LoKr, LoCon-Tucker and full diffs are read:
# tests/formats/test_lycoris*.py)
LYCORIS = {
    "OFT": {"lora_unet_a_b.oft_blocks": randn(2, 2, 2)},
    "GLoRA": {"lora_unet_a_b.a1.weight": randn(2, 4), "lora_unet_a_b.a2.weight": randn(4, 2),
              "lora_unet_a_b.b1.weight": randn(2, 4), "lora_unet_a_b.b2.weight": randn(4, 2)},
    "IA3": {"lora_unet_a_b.ia3_l": randn(4)},
    "norm": {"lora_unet_a_b.w_norm": randn(4), "lora_unet_a_b.b_norm": randn(4)},
}


@pytest.mark.parametrize("variant", list(LYCORIS))
def test_lycoris_variants_refused_by_name(tmp_path, variant):
    f = write_st(tmp_path / "x.safetensors", LYCORIS[variant])
    with pytest.raises(UnsupportedVariantError) as e:
        lorakit.load(f)
    msg = str(e.value)
    assert variant.split("/")[0] in msg and "x.safetensors" in msg and "lora_unet_a_b." in msg
    with pytest.raises(UnsupportedVariantError):
        lorakit.formats.detect.detect_format(f)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_embedding_lora_is_refused_by_name_outside_peft(tmp_path, fmt):
    emb = LoraModule(randn(4, 50), randn(8, 4, seed=1), alpha=4.0, kind=ModuleKind.EMBEDDING)
    a = Adapter(modules={"model.embed_tokens": emb})
    with pytest.raises(UnsupportedVariantError, match="embedding LoRA") as e:
        lorakit.save(a, tmp_path / "out.safetensors", fmt)
    assert "model.embed_tokens" in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()
    assert lorakit.load(lorakit.save(a, tmp_path / "peft", "peft")).modules[
        "model.embed_tokens"].kind is ModuleKind.EMBEDDING
