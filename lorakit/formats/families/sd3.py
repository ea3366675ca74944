"""Stable Diffusion 3 / 3.5 (MMDiT, MMDiT-X): up to 38 joint blocks (24 in SD3/3.5 medium).

Native (SAI / sd-scripts) names: ``joint_blocks.N.x_block.attn.qkv`` is ``attn.to_q``, ``to_k``,
``to_v``; ``context_block.attn.qkv`` the ``add_*_proj``; ``x_block.attn2.qkv`` (SD3.5 medium's
dual attention) ``attn2.to_*``. The last block's ``context_block.adaLN_modulation.1`` (2x, pre-only)
and ``final_layer.adaLN_modulation.1`` are diffusers' ``(scale, shift)`` swapped.

Example:
    >>> SD3.native_rule("joint_blocks.2.context_block.attn.qkv")[1][0]
    'transformer_blocks.2.attn.add_q_proj'
"""

from __future__ import annotations

from lorakit.formats.families.anima import ANIMA_ONLY
from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed
from lorakit.formats.families.clip import CLIP_L, clip, t5

J, B = "joint_blocks.{i}", "transformer_blocks.{i}"
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_QKV2 = ("attn2.to_q", "attn2.to_k", "attn2.to_v")
BLOCK_SUBS = (*_QKV, "attn.to_out.0", *_ADD, "attn.to_add_out", *_QKV2, "attn2.to_out.0",
              "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
              "norm1.linear", "norm1_context.linear")
TOP = ("pos_embed.proj", "context_embedder", "proj_out", "norm_out.linear",
       "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
       "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")


def _b(*subs: str) -> tuple[str, ...]:
    return tuple(f"{B}.{s}" for s in subs)


NATIVE = (
    Rule(f"{J}.x_block.attn.qkv", _b(*_QKV)),
    Rule(f"{J}.x_block.attn.proj", _b("attn.to_out.0")),
    Rule(f"{J}.x_block.attn2.qkv", _b(*_QKV2)),
    Rule(f"{J}.x_block.attn2.proj", _b("attn2.to_out.0")),
    Rule(f"{J}.x_block.mlp.fc1", _b("ff.net.0.proj")),
    Rule(f"{J}.x_block.mlp.fc2", _b("ff.net.2")),
    Rule(f"{J}.x_block.adaLN_modulation.1", _b("norm1.linear")),
    Rule(f"{J}.context_block.attn.qkv", _b(*_ADD)),
    Rule(f"{J}.context_block.attn.proj", _b("attn.to_add_out")),
    Rule(f"{J}.context_block.mlp.fc1", _b("ff_context.net.0.proj")),
    Rule(f"{J}.context_block.mlp.fc2", _b("ff_context.net.2")),
    Rule(f"{J}.context_block.adaLN_modulation.1", _b("norm1_context.linear"), swap=True),
    Rule("x_embedder.proj", ("pos_embed.proj",)),
    Rule("context_embedder", ("context_embedder",)),
    Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)

SD3 = Family(
    name="sd3", title="SD3 / SD3.5",
    components=(
        Component("transformer", "transformer", "lora_unet_", known=(indexed(*_b(*BLOCK_SUBS),
                                                                              *TOP),),
                  blocks=(BlockType("joint blocks", B, 38, BLOCK_SUBS),)),
        CLIP_L, clip("text_encoder_2", "text encoder 2", "lora_te2_", 32),
        t5("text_encoder_3", "text encoder 3 (T5)", "lora_te3_")),
    rules=NATIVE, layouts=("diffusers", "kohya", "peft"),
    modelspec="stable-diffusion-v3-medium/lora", base_version="sd3",
    markers=(r"^joint_blocks\.", r"^transformer_blocks\.\d+\.attn2\.", r"^pos_embed\.proj$",
             r"^(x|t|y)_embedder\."),
    anti_markers=(r"^transformer_blocks\.\d+\.attn1\.",  # LTX-Video's blocks
                  r"^(double|single)_stream_blocks\.", r"^t_embedder\.timestep_embedder\.",  # HiDream's
                  *ANIMA_ONLY),  # Anima's (Cosmos) names
)
