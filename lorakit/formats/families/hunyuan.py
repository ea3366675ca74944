"""HunyuanVideo (diffusers ``HunyuanVideoTransformer3DModel``): 20 double-stream and 40
single-stream blocks, hidden size 3072, MLP ratio 4, a 2-block token refiner on the text input.

diffusers names its blocks as it names Flux.1's (``transformer_blocks.N.attn.to_q``,
``single_transformer_blocks.N.proj_mlp``). The original checkpoint's names (musubi-tuner's kohya
files, ComfyUI's ``diffusion_model.`` files, what diffusers'
``_convert_hunyuan_video_lora_to_diffusers`` reads) fuse as Flux's do, with underscores:
``double_blocks.N.img_attn_qkv`` is ``attn.to_q``, ``to_k``, ``to_v``; ``single_blocks.N.linear1``
is ``attn.to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` (rows 1 : 1 : 1 : 4); the token refiner's
``self_attn_qkv`` is its ``attn.to_q/k/v``; ``final_layer.adaLN_modulation.1`` is
``norm_out.linear`` with its shift and scale halves swapped.

Detection: names only HunyuanVideo has (``img_mlp.fc1``, ``img_mod.linear``, ``txt_in.``,
``context_embedder.token_refiner.``...) rule Flux.1 out. A file of layers both spell alike
(``img_attn_qkv`` in kohya, diffusers attention layers) is Flux.1 unless metadata says
HunyuanVideo (``lorakit.family``, ``modelspec.architecture``) or ``--family hunyuanvideo``.

Example:
    >>> HUNYUAN_VIDEO.native_rule("double_blocks.2.txt_attn_qkv")[1][0]
    'transformer_blocks.2.attn.add_q_proj'
    >>> HUNYUAN_VIDEO.native_rule("single_blocks.0.linear1")[0].ratios
    (1, 1, 1, 4)
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under
from lorakit.formats.families.flux import DOUBLE_SUBS, HUNYUAN_ONLY, SINGLE_SUBS

D, S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
R = "context_embedder.token_refiner.refiner_blocks.{i}"  # diffusers' token refiner block
NR = "txt_in.individual_token_refiner.blocks.{i}"  # the original's
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
REFINER_SUBS = (*_QKV, "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "norm_out.linear")
_TOP = {  # original name -> diffusers name, one layer each
    "img_in.proj": "x_embedder.proj",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


NATIVE = (
    Rule("double_blocks.{i}.img_attn_qkv", under(D, *_QKV)),
    Rule("double_blocks.{i}.img_attn_proj", under(D, "attn.to_out.0")),
    Rule("double_blocks.{i}.txt_attn_qkv", under(D, *_ADD_QKV)),
    Rule("double_blocks.{i}.txt_attn_proj", under(D, "attn.to_add_out")),
    Rule("double_blocks.{i}.img_mlp.fc1", under(D, "ff.net.0.proj")),
    Rule("double_blocks.{i}.img_mlp.fc2", under(D, "ff.net.2")),
    Rule("double_blocks.{i}.txt_mlp.fc1", under(D, "ff_context.net.0.proj")),
    Rule("double_blocks.{i}.txt_mlp.fc2", under(D, "ff_context.net.2")),
    Rule("double_blocks.{i}.img_mod.linear", under(D, "norm1.linear")),
    Rule("double_blocks.{i}.txt_mod.linear", under(D, "norm1_context.linear")),
    Rule("single_blocks.{i}.linear1", under(S, *_QKV, "proj_mlp"), ratios=(1, 1, 1, 4)),
    Rule("single_blocks.{i}.linear2", under(S, "proj_out")),
    Rule("single_blocks.{i}.modulation.linear", under(S, "norm.linear")),
    Rule(f"{NR}.self_attn_qkv", under(R, *_QKV)),
    Rule(f"{NR}.self_attn_proj", under(R, "attn.to_out.0")),
    Rule(f"{NR}.mlp.fc1", under(R, "ff.net.0.proj")),
    Rule(f"{NR}.mlp.fc2", under(R, "ff.net.2")),
    Rule(f"{NR}.adaLN_modulation.1", under(R, "norm_out.linear")),  # (gate, gate): no swap
    *(Rule(native, (ours,)) for native, ours in _TOP.items()),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*under(D, *DOUBLE_SUBS), *under(S, *SINGLE_SUBS), *under(R, *REFINER_SUBS),
                   *_TOP.values(), "norm_out.linear"),),
    blocks=(BlockType("double blocks", D, 20, DOUBLE_SUBS),
            BlockType("single blocks", S, 40, SINGLE_SUBS)))

HUNYUAN_VIDEO = Family(
    name="hunyuanvideo", title="HunyuanVideo", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "kohya", "bfl", "peft"), modelspec="hunyuan-video/lora",
    base_version="hunyuan_video", markers=HUNYUAN_ONLY, twin_of="flux1",
    anti_markers=(r"^(double|single)_stream_blocks\.", r"^joint_blocks\.",  # HiDream's, SD3's
                  r"^txt_in\.linear_[12]$"),  # blocks (both have an x_embedder.proj too), Krea 2's
)
