"""LTX-2 (diffusers ``LTX2VideoTransformer3DModel`` and ``LTX2TextConnectors``, ``LTX2Pipeline``):
an audio + video transformer, 48 blocks (its default config ``num_layers``), video hidden size
4096 (32 heads of 128), audio 2048 (32 heads of 64), and the text connectors in front of it.

Each transformer block has a video and an audio stream: self-attention ``attn1`` /
``audio_attn1``, prompt cross-attention ``attn2`` / ``audio_attn2``, the audio-video cross
attention ``audio_to_video_attn`` (video queries, audio keys/values) and ``video_to_audio_attn``
(the reverse), each with ``to_q``/``to_k``/``to_v``/``to_out.0`` (and LTX-2.3's gated
``to_gate_logits``), and feed-forwards ``ff.net.0.proj``/``ff.net.2`` and ``audio_ff.*``.
The text connectors (pipeline component ``connectors``) are ``text_proj_in`` (LTX-2.3:
``video_text_proj_in`` and ``audio_text_proj_in``) and a video and an audio 1-D transformer
(``video_connector.transformer_blocks.N`` / ``audio_connector...``, 2 blocks each).

The original checkpoint (ComfyUI's ``diffusion_model.`` files, what diffusers'
``_convert_non_diffusers_ltx2_lora_to_diffusers`` reads) spells the blocks as diffusers does and
renames top-level layers one to one (no fused layer): ``patchify_proj`` is ``proj_in``,
``adaln_single`` ``time_embed``, ``av_ca_video_scale_shift_adaln_single``
``av_cross_attn_video_scale_shift``, ``prompt_adaln_single`` (LTX-2.3) ``prompt_adaln``, and their
``audio_`` twins. A ComfyUI file holds the connectors under ``text_embedding_projection.``
(diffusers reads that prefix into ``connectors``), where ``aggregate_embed`` is ``text_proj_in``
and the connector blocks keep the diffusers names.

Detection: LTX-Video shares every video-stream name (``transformer_blocks.N.attn1.to_q``,
``caption_projection.``, ``time_embed.emb.``); names only LTX-2 has (the audio stream, the
audio-video cross attention and its modulations, the connectors) rule LTX-Video out. A file of
shared names only is LTX-Video's unless metadata says LTX-2 (``lorakit.family``,
``modelspec.architecture``) or ``--family ltx2``.

Example:
    >>> LTX2.native_rule("av_ca_a2v_gate_adaln_single.linear")[1]
    ['av_cross_attn_video_a2v_gate.linear']
    >>> LTX2.knows("transformer", "transformer_blocks.47.video_to_audio_attn.to_v")
    True
    >>> LTX2.knows("connectors", "aggregate_embed")
    True
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under

_QKVO = ("to_q", "to_k", "to_v", "to_out.0")
ATTNS = ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn",
         "video_to_audio_attn")
_FF = ("ff.net.0.proj", "ff.net.2")
# the layers of a block an LTX-2.0 LoRA adapts (LTX-2.3's to_gate_logits is known, not counted)
BLOCK_SUBS = (*(f"{a}.{p}" for a in ATTNS for p in _QKVO), *_FF,
              *(f"audio_{f}" for f in _FF))
_GATES = tuple(f"{a}.to_gate_logits" for a in ATTNS)
B = "transformer_blocks.{i}"

_ADALN = ("linear", "emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2")
_ADALN_NAMES = {  # original prefix -> diffusers prefix of a LTX2AdaLayerNormSingle
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "prompt_adaln_single": "prompt_adaln",  # LTX-2.3
    "audio_prompt_adaln_single": "audio_prompt_adaln",
}
_TOP = {  # original name -> diffusers name, one layer each
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    **{f"{o}.{s}": f"{d}.{s}" for o, d in _ADALN_NAMES.items() for s in _ADALN},
}
_SAME_TOP = ("proj_out", "audio_proj_out", "caption_projection.linear_1",
             "caption_projection.linear_2", "audio_caption_projection.linear_1",
             "audio_caption_projection.linear_2")

NATIVE = (*(Rule(native, (ours,)) for native, ours in _TOP.items()),
          *(Rule(p, (p,)) for p in (*under(B, *BLOCK_SUBS, *_GATES), *_SAME_TOP)))

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*under(B, *BLOCK_SUBS, *_GATES), *_TOP.values(), *_SAME_TOP),),
    blocks=(BlockType("blocks", B, 48, BLOCK_SUBS),))

CONNECTOR_SUBS = (*(f"attn1.{p}" for p in _QKVO), *_FF)
_CONNECTORS = ("video_connector", "audio_connector")
_PROJ = {"aggregate_embed": "text_proj_in",  # LTX-2.0: one projection for both streams
         "video_aggregate_embed": "video_text_proj_in",  # LTX-2.3: one per stream
         "audio_aggregate_embed": "audio_text_proj_in"}

CONNECTORS = Component(
    "connectors", "connectors", "lora_connectors_",
    known=(indexed(*_PROJ.values(), *(p for c in _CONNECTORS for p in under(
        f"{c}.transformer_blocks.{{i}}", *CONNECTOR_SUBS, "attn1.to_gate_logits"))),),
    blocks=tuple(BlockType(f"{c.replace('_', ' ')} blocks", f"{c}.transformer_blocks.{{i}}", 2,
                           CONNECTOR_SUBS) for c in _CONNECTORS),
    rules=(*(Rule(native, (ours,)) for native, ours in _PROJ.items()),
           *(Rule(p, (p,)) for c in _CONNECTORS for p in under(
               f"{c}.transformer_blocks.{{i}}", *CONNECTOR_SUBS, "attn1.to_gate_logits"))))

_AB = r"^transformer_blocks\.\d+\."
# names only LTX-2 has (a hit rules LTX-Video out)
LTX2_ONLY = (_AB + r"(audio_(attn[12]|ff)|audio_to_video_attn|video_to_audio_attn)\.",
             r"^(audio_(proj_in|proj_out|patchify_proj|time_embed|adaln_single|"
             r"caption_projection|prompt_adaln)|av_cross_attn_|av_ca_|prompt_adaln)",
             r"^(video_|audio_)?(text_proj_in|aggregate_embed)$",
             r"^(video|audio)_connector\.transformer_blocks\.")

LTX2 = Family(
    name="ltx2", title="LTX-2", components=(TRANSFORMER, CONNECTORS), rules=NATIVE,
    layouts=("diffusers", "bfl", "peft"), modelspec="ltx-2/lora", base_version="ltx2",
    markers=LTX2_ONLY, twin_of="ltxvideo",
    anti_markers=(_AB + r"attn\.",  # Flux.1 / SD3 / Qwen-Image blocks
                  r"^caption_projection\.\d+\.linear$"),  # HiDream's projections
)
