"""Flux.2 (diffusers ``Flux2Transformer2DModel``): 8 double-stream and 48 single-stream blocks
(its default config), hidden size 6144 (48 heads of 128), MLP ratio 3 with SwiGLU.

diffusers names differ from Flux.1's: the feed-forwards are ``ff.linear_in``/``ff.linear_out``
(and ``ff_context.``), a single block is one fused ``attn.to_qkv_mlp_proj`` and one
``attn.to_out``, the modulations are shared at the top (``double_stream_modulation_img.linear``,
``double_stream_modulation_txt.linear``, ``single_stream_modulation.linear``, no per-block
``norm1.linear``) and the embedders are ``time_guidance_embed.``. The original (BFL) names, which
ComfyUI's ``diffusion_model.`` files and kohya files use (what diffusers'
``_convert_non_diffusers_flux2_lora_to_diffusers`` and ``_convert_kohya_flux2_lora_to_diffusers``
read), are Flux.1's: ``double_blocks.N.img_attn.qkv`` is ``attn.to_q``, ``to_k``, ``to_v``;
``single_blocks.N.linear1`` is ``attn.to_qkv_mlp_proj`` and ``linear2`` ``attn.to_out`` (one layer
each: diffusers keeps them fused); ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with
its shift and scale halves swapped.

Detection: names only Flux.2 has (``ff.linear_in``, ``attn.to_qkv_mlp_proj``,
``time_guidance_embed.``, the shared modulations) rule Flux.1 out. A file of layers both spell
alike (``img_attn.qkv``, ``linear1``, diffusers attention layers) is Flux.1 unless metadata says
Flux.2 (``lorakit.family``, ``modelspec.architecture``), its shapes have Flux.2's proportions
(``img_mlp.0`` 6 x its input, ``linear1`` 9 x, ``linear2`` input 4 x its output) or
``--family flux2``.

Example:
    >>> FLUX2.native_rule("double_blocks.2.txt_attn.qkv")[1][0]
    'transformer_blocks.2.attn.add_q_proj'
    >>> FLUX2.native_rule("single_blocks.0.linear1")[1]
    ['single_transformer_blocks.0.attn.to_qkv_mlp_proj']
"""

from __future__ import annotations

import re

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under
from lorakit.formats.families.flux3 import FLUX3_ONLY

D, S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
DOUBLE_SUBS = (*_QKV, "attn.to_out.0", *_ADD_QKV, "attn.to_add_out", "ff.linear_in",
               "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
SINGLE_SUBS = ("attn.to_qkv_mlp_proj", "attn.to_out")
_TOP = {  # original name -> diffusers name, one layer each
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}


NATIVE = (
    Rule("double_blocks.{i}.img_attn.qkv", under(D, *_QKV)),
    Rule("double_blocks.{i}.img_attn.proj", under(D, "attn.to_out.0")),
    Rule("double_blocks.{i}.txt_attn.qkv", under(D, *_ADD_QKV)),
    Rule("double_blocks.{i}.txt_attn.proj", under(D, "attn.to_add_out")),
    Rule("double_blocks.{i}.img_mlp.0", under(D, "ff.linear_in")),
    Rule("double_blocks.{i}.img_mlp.2", under(D, "ff.linear_out")),
    Rule("double_blocks.{i}.txt_mlp.0", under(D, "ff_context.linear_in")),
    Rule("double_blocks.{i}.txt_mlp.2", under(D, "ff_context.linear_out")),
    Rule("single_blocks.{i}.linear1", under(S, "attn.to_qkv_mlp_proj")),
    Rule("single_blocks.{i}.linear2", under(S, "attn.to_out")),
    *(Rule(native, (ours,)) for native, ours in _TOP.items()),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)

# Flux.2 names no Flux.1 file has (diffusers' SwiGLU feed-forwards, fused single-block layers,
# embedders and shared modulations; the original's shared modulations): a hit rules Flux.1 out
FLUX2_ONLY = (r"^transformer_blocks\.\d+\.ff(_context)?\.linear_(in|out)$",
              r"^single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)$",
              r"^time_guidance_embed\.",
              r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin(ear)?$")
# Flux.1 names no Flux.2 file has (per-block modulations, GELU feed-forwards, split single
# blocks, its pooled-text embedder)
FLUX1_ONLY = (r"^transformer_blocks\.\d+\.(norm1|norm1_context)\.linear$",
              r"^transformer_blocks\.\d+\.ff(_context)?\.net\.",
              r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)$",
              r"^double_blocks\.\d+\.(img|txt)_mod\.lin$", r"^single_blocks\.\d+\.modulation\.",
              r"^time_text_embed\.", r"^vector_in\.")

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*under(D, *DOUBLE_SUBS), *under(S, *SINGLE_SUBS), *_TOP.values(),
                   "norm_out.linear"),),
    blocks=(BlockType("double blocks", D, 8, DOUBLE_SUBS),
            BlockType("single blocks", S, 48, SINGLE_SUBS)))

FLUX2 = Family(
    name="flux2", title="Flux.2", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "kohya", "bfl", "peft"), modelspec="flux-2-dev/lora",
    base_version="flux2", markers=FLUX2_ONLY, twin_of="flux1",
    anti_markers=(*FLUX1_ONLY, r"^(double|single)_stream_blocks\.", r"^joint_blocks\.",
                  r"^double_blocks\.\d+\.(img|txt)_(attn_(qkv|proj)|mlp\.fc[12]|mod\.linear)$",
                  r"^txt_in\.", r"^context_embedder\.(proj_in|token_refiner\.|time_text_embed\.)",
                  *FLUX3_ONLY),
    # HiDream's, SD3's and HunyuanVideo's blocks
)

# Flux.2's proportions of the BFL layers it spells as Flux.1 does (SwiGLU feed-forward of ratio
# 3; Flux.1: GELU of ratio 4): a file of shared names with these shapes is Flux.2's
_PROPORTIONS = ((re.compile(r"^double_blocks\.\d+\.(img|txt)_mlp\.0$"), 6, 1),
                (re.compile(r"^double_blocks\.\d+\.(img|txt)_mlp\.2$"), 1, 3),
                (re.compile(r"^single_blocks\.\d+\.linear1$"), 9, 1),
                (re.compile(r"^single_blocks\.\d+\.linear2$"), 1, 4))


def has_flux2_proportions(paths, shapes) -> bool:
    """Whether a denoiser path of ``paths`` shared with Flux.1 has Flux.2's shape
    (``shapes``: ``{path: (out, in)}``).

    Example:
        >>> has_flux2_proportions(["single_blocks.0.linear1"], {"single_blocks.0.linear1": (72, 8)})
        True
    """
    for p in paths:
        io = shapes.get(p)
        if io is None:
            continue
        for rx, o, i in _PROPORTIONS:
            if rx.match(p) and io[0] * i == io[1] * o:
                return True
    return False
