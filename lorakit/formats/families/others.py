"""Further diffusion transformers whose LoRAs diffusers' loaders convert, with the same module
names in every layout (their native checkpoints use diffusers' names): Qwen-Image (60 blocks)
and LTX-Video (28 blocks). Their kohya files are ``lora_unet_`` + those names, their ComfyUI
files ``diffusion_model.`` + those names.

Example:
    >>> QWEN_IMAGE.denoiser.knows("transformer_blocks.3.img_mlp.net.0.proj")
    True
"""

from __future__ import annotations

from lorakit.formats.families.anima import ANIMA_ONLY
from lorakit.formats.families.base import BlockType, Component, Family, indexed
from lorakit.formats.families.ltx2 import LTX2_ONLY

_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
QWEN_SUBS = (*_ATTN, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
             "txt_mlp.net.2", "img_mod.1", "txt_mod.1")
_QWEN_TOP = ("img_in", "txt_in", "proj_out", "norm_out.linear",
             "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2")

QWEN_IMAGE = Family(
    name="qwenimage", title="Qwen-Image",
    components=(Component("transformer", "transformer", "lora_unet_", known=(indexed(
        *(f"transformer_blocks.{{i}}.{s}" for s in QWEN_SUBS), *_QWEN_TOP),),
        blocks=(BlockType("blocks", "transformer_blocks.{i}", 60, QWEN_SUBS),)),),
    layouts=("diffusers", "kohya", "bfl", "peft"), modelspec="qwen-image/lora",
    base_version="qwen_image",
    markers=(r"^transformer_blocks\.\d+\.(img|txt)_(mlp|mod)\.",),
)

LTX_SUBS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
            "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_LTX_TOP = ("proj_in", "proj_out", "caption_projection.linear_1", "caption_projection.linear_2",
            "time_embed.linear", "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2")

LTX_VIDEO = Family(
    name="ltxvideo", title="LTX-Video",
    components=(Component("transformer", "transformer", "lora_unet_", known=(indexed(
        *(f"transformer_blocks.{{i}}.{s}" for s in LTX_SUBS), *_LTX_TOP),),
        blocks=(BlockType("blocks", "transformer_blocks.{i}", 28, LTX_SUBS),)),),
    layouts=("diffusers", "bfl", "peft"), modelspec="ltx-video/lora", base_version="ltxv",
    markers=(r"^transformer_blocks\.\d+\.attn1\.", r"^caption_projection\.",
             r"^time_embed\.emb\."),
    anti_markers=(r"^transformer_blocks\.\d+\.attn\.",  # Flux.1 / SD3 / Qwen-Image blocks
                  r"^caption_projection\.\d+\.linear$",  # HiDream's projections
                  *LTX2_ONLY,  # LTX-2's audio stream, audio-video attention, connectors
                  *ANIMA_ONLY),  # Anima's (Cosmos) names
)
