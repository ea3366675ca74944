"""Flux.1 (dev, schnell and their fine-tunes): 19 double-stream and 38 single-stream blocks,
hidden size 3072, MLP ratio 4.

Native (BFL) names fuse diffusers layers: a double block's ``img_attn.qkv`` is ``attn.to_q``,
``to_k``, ``to_v``; a single block's ``linear1`` is ``attn.to_q``, ``to_k``, ``to_v`` and
``proj_mlp`` (rows 3072 + 3072 + 3072 + 12288) and ``linear2`` is ``proj_out`` (input
3072 + 12288). ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` with its
shift and scale halves swapped. BFL's Flux.1 Canny/Depth control LoRAs also carry the query/key
RMSNorm scales of every block as full tensors (``double_blocks.N.img_attn.norm.query_norm.scale``
= diffusers' ``attn.norm_q.weight``), which replace the base's, and widen ``img_in`` to 128 input
channels (the base ``x_embedder`` takes 64). XLabs files spell attention processors
(``double_blocks.N.processor.qkv_lora1``); their single-block ``qkv_lora`` covers only the
attention rows of ``linear1``.

Example:
    >>> FLUX1.native_rule("single_blocks.0.linear1")[1][-1]
    'single_transformer_blocks.0.proj_mlp'
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed
from lorakit.formats.families.clip import CLIP_L, t5
from lorakit.formats.families.flux2 import FLUX2_ONLY
from lorakit.formats.families.flux3 import FLUX3_ONLY

D, S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
DOUBLE_SUBS = (*_QKV, "attn.to_out.0", *_ADD_QKV, "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
               "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear")
SINGLE_SUBS = (*_QKV, "proj_mlp", "proj_out", "norm.linear")
TOP = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",
       "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
       "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
       "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2")


def _d(*subs: str) -> tuple[str, ...]:
    return tuple(f"{D}.{s}" for s in subs)


def _s(*subs: str) -> tuple[str, ...]:
    return tuple(f"{S}.{s}" for s in subs)


NATIVE = (
    Rule("double_blocks.{i}.img_attn.qkv", _d(*_QKV)),
    Rule("double_blocks.{i}.img_attn.proj", _d("attn.to_out.0")),
    Rule("double_blocks.{i}.txt_attn.qkv", _d(*_ADD_QKV)),
    Rule("double_blocks.{i}.txt_attn.proj", _d("attn.to_add_out")),
    Rule("double_blocks.{i}.img_mlp.0", _d("ff.net.0.proj")),
    Rule("double_blocks.{i}.img_mlp.2", _d("ff.net.2")),
    Rule("double_blocks.{i}.txt_mlp.0", _d("ff_context.net.0.proj")),
    Rule("double_blocks.{i}.txt_mlp.2", _d("ff_context.net.2")),
    Rule("double_blocks.{i}.img_mod.lin", _d("norm1.linear")),
    Rule("double_blocks.{i}.txt_mod.lin", _d("norm1_context.linear")),
    Rule("single_blocks.{i}.linear1", _s(*_QKV, "proj_mlp"), ratios=(1, 1, 1, 4)),
    Rule("single_blocks.{i}.linear2", _s("proj_out")),
    Rule("single_blocks.{i}.modulation.lin", _s("norm.linear")),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)

XLABS = (
    Rule("double_blocks.{i}.processor.qkv_lora1", _d(*_QKV)),
    Rule("double_blocks.{i}.processor.proj_lora1", _d("attn.to_out.0")),
    Rule("double_blocks.{i}.processor.qkv_lora2", _d(*_ADD_QKV)),
    Rule("double_blocks.{i}.processor.proj_lora2", _d("attn.to_add_out")),
    Rule("single_blocks.{i}.processor.qkv_lora", _s(*_QKV)),
    Rule("single_blocks.{i}.processor.proj_lora", _s("proj_out")),
)

# HunyuanVideo names no Flux.1 file has (its original checkpoint's underscored attention names,
# ``fc1``/``mod.linear``, its token refiner and embedders): a hit rules Flux.1 out
HUNYUAN_ONLY = (r"^double_blocks\.\d+\.(img|txt)_(attn_(qkv|proj)|mlp\.fc[12]|mod\.linear)$",
                r"^single_blocks\.\d+\.modulation\.linear$", r"^txt_in\.",
                r"^context_embedder\.(proj_in|token_refiner\.|time_text_embed\.)",
                r"^(img_in|x_embedder)\.proj$", r"^(time_in|guidance_in)\.mlp\.")

# full tensors of a BFL control LoRA (Flux.1 Canny/Depth): the query/key RMSNorm scales, which
# replace the base's (diffusers loads them into the transformer, ComfyUI sets them)
NORMS = (
    Rule("double_blocks.{i}.img_attn.norm.query_norm.scale", (f"{D}.attn.norm_q.weight",)),
    Rule("double_blocks.{i}.img_attn.norm.key_norm.scale", (f"{D}.attn.norm_k.weight",)),
    Rule("double_blocks.{i}.txt_attn.norm.query_norm.scale", (f"{D}.attn.norm_added_q.weight",)),
    Rule("double_blocks.{i}.txt_attn.norm.key_norm.scale", (f"{D}.attn.norm_added_k.weight",)),
    Rule("single_blocks.{i}.norm.query_norm.scale", (f"{S}.attn.norm_q.weight",)),
    Rule("single_blocks.{i}.norm.key_norm.scale", (f"{S}.attn.norm_k.weight",)),
)

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*_d(*DOUBLE_SUBS), *_s(*SINGLE_SUBS), *TOP),),
    blocks=(BlockType("double blocks", D, 19, DOUBLE_SUBS),
            BlockType("single blocks", S, 38, SINGLE_SUBS)))

FLUX1 = Family(
    name="flux1", title="Flux.1",
    components=(TRANSFORMER, CLIP_L, t5("text_encoder_2", "text encoder 2 (T5)", "lora_te3_")),
    rules=NATIVE, namings={"xlabs": XLABS},
    layouts=("diffusers", "aitoolkit", "simpletuner", "kohya", "bfl", "xlabs", "peft",
             "falkontext", "bflcontrol"),
    modelspec="flux-1-dev/lora", base_version="flux1",
    markers=(r"^single_transformer_blocks\.", r"^(double|single)_blocks\.",
             r"^time_text_embed\.guidance_embedder\.", r"^x_embedder$"),
    anti_markers=(*HUNYUAN_ONLY, *FLUX2_ONLY, *FLUX3_ONLY),
    extras=NORMS, base_inputs=(("x_embedder", 64),),
)
