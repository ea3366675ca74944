"""kohya name <-> dotted module path mapping (lorakit/naming.py) for SD1.5, SDXL and LLM names."""

from __future__ import annotations

import pytest

from lorakit.formats.kohya import kohya_module_key
from lorakit.naming import (
    dotted_to_kohya,
    kohya_prefix_for,
    kohya_to_dotted,
    split_component,
    split_kohya_name,
)

SD15_UNET = [
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
    "down_blocks.1.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.resnets.1.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "mid_block.attentions.0.proj_out",
    "mid_block.resnets.1.conv2",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v",
    "up_blocks.1.upsamplers.0.conv",
    "conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
]
SDXL_UNET = [
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
    "add_embedding.linear_1", "add_embedding.linear_2",
    "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.0.proj",
]
CLIP = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.11.self_attn.out_proj",
    "text_model.encoder.layers.5.mlp.fc1",
    "text_model.encoder.layers.31.mlp.fc2",
]
LLM = [
    "model.layers.0.self_attn.q_proj", "model.layers.29.self_attn.v_proj",
    "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj",
    "model.embed_tokens", "lm_head",
    "transformer.h.0.attn.c_attn", "transformer.h.11.attn.c_proj", "transformer.h.3.mlp.c_fc",
    "distilbert.transformer.layer.0.attention.q_lin", "bert.encoder.layer.0.attention.self.query",
    "roberta.encoder.layer.0.attention.output.dense",
    "encoder.block.0.layer.0.SelfAttention.q", "decoder.block.3.layer.1.EncDecAttention.q",
    "encoder.block.0.layer.1.DenseReluDense.wi_0", "encoder.block.0.layer.1.DenseReluDense.wi_1",
    "vit.encoder.layer.0.attention.attention.query",
    "transformer.h.0.self_attention.query_key_value", "gpt_neox.layers.0.mlp.dense_h_to_4h",
    "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj",
    "model.layers.0.block_sparse_moe.experts.3.w1", "model.layers.0.mlp.shared_expert.gate_proj",
    "transformer.h.0.mlp.fc_in", "model.decoder.layers.0.encoder_attn.k_proj",
    "backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.x_proj",
]


@pytest.mark.parametrize("path", SD15_UNET + SDXL_UNET + CLIP + LLM)
def test_dotted_name_survives_kohya_form(path):
    assert kohya_to_dotted(path.replace(".", "_")) == path


@pytest.mark.parametrize("path", SD15_UNET + SDXL_UNET)
def test_unet_names_round_trip(path):
    name = dotted_to_kohya("unet", path)
    assert name == "lora_unet_" + path.replace(".", "_")
    assert kohya_module_key(name) == f"unet.{path}"


@pytest.mark.parametrize("path", CLIP)
def test_text_encoder_names_sd15_and_sdxl(path):
    # SD1.5: one text encoder, lora_te_
    name = dotted_to_kohya("text_encoder", path, ["unet", "text_encoder"])
    assert name.startswith("lora_te_") and kohya_module_key(name) == f"text_encoder.{path}"
    # SDXL: lora_te1_ / lora_te2_ as soon as the second encoder is present
    comps = ["unet", "text_encoder", "text_encoder_2"]
    n1, n2 = dotted_to_kohya("text_encoder", path, comps), dotted_to_kohya("text_encoder_2", path,
                                                                            comps)
    assert n1.startswith("lora_te1_") and n2.startswith("lora_te2_")
    assert kohya_module_key(n1) == f"text_encoder.{path}"
    assert kohya_module_key(n2) == f"text_encoder_2.{path}"


@pytest.mark.parametrize("path", LLM)
def test_llm_names_round_trip_without_component(path):
    name = dotted_to_kohya(None, path)
    assert name == "lora_" + path.replace(".", "_")
    assert kohya_module_key(name, components=False) == path


def test_kohya_prefixes():
    assert split_kohya_name("lora_te1_text_model_x") == ("text_encoder", "text_model_x")
    assert split_kohya_name("lora_te2_text_model_x") == ("text_encoder_2", "text_model_x")
    assert split_kohya_name("lora_te_text_model_x") == ("text_encoder", "text_model_x")
    assert split_kohya_name("lora_unet_mid_block") == ("unet", "mid_block")
    assert split_kohya_name("lora_model_layers_0") == (None, "model_layers_0")
    assert split_kohya_name("hada_w1") == (None, "")
    assert kohya_prefix_for("unet", []) == "lora_unet_"
    assert kohya_prefix_for(None, []) == "lora_"
    # the doubled prefix of hand-made "kohya-like" files
    assert kohya_module_key("lora_unet_unet_mid_block_attentions_0_proj_in") == \
        "unet.mid_block.attentions.0.proj_in"


def test_split_component():
    assert split_component("unet.down_blocks.0") == ("unet", "down_blocks.0")
    assert split_component("text_encoder_2.text_model.x") == ("text_encoder_2", "text_model.x")
    assert split_component("model.layers.0") == (None, "model.layers.0")
    assert split_component("unet") == (None, "unet")
