"""Flux.3 (diffusers ``Flux3Transformer2DModel``, ``Flux3ModularPipeline``): 5 per-mode blocks for
each token mode (the image, the reference image ``image_cond`` and the text) and 28 joint single
blocks (its default config), hidden size 3072 (24 heads of 128), SwiGLU feed-forwards of ratio 3.

diffusers names: ``mode_blocks.image.N`` / ``mode_blocks.image_cond.N`` / ``txt_mode_blocks.N``
and ``single_transformer_blocks.N``, each ``attn.to_q``/``to_k``/``to_v``/``to_out.0`` and
``ff.linear_in``/``ff.linear_out`` (no fused layer); per-mode modulations
``early_stream_modulations.{image,image_cond,txt}.linear`` and
``single_stream_modulations.*.linear``, ``x_embedders.image``/``.image_cond``,
``context_embedder``, ``timestep_embedder.linear_1/2`` (``target_timestep_embedder.`` in the
step-distilled models), ``norm_out.linear``, ``proj_out``. The original (BFL) names, which ComfyUI's
``diffusion_model.`` files use (what diffusers' ``_convert_non_diffusers_flux3_lora_to_diffusers``
reads): ``content_mode_blocks.image.N``, ``txt_mode_blocks.N``, ``single_blocks.N``, each
``q_proj``/``k_proj``/``v_proj``/``attn_out``/``mlp_in``/``mlp_out``; ``emb_in.image``,
``txt_in``, ``time_in.in_layer``/``out_layer``, ``ref_time_in.``, ``*_modulations.*.lin``,
``final_layer.image.linear`` and ``final_layer.image.adaLN_modulation.1`` (diffusers'
``norm_out.linear`` with shift and scale swapped). Every native layer is one diffusers layer.

Detection: Flux.1 shares ``single_transformer_blocks.N.attn.to_q``/``to_k``/``to_v``,
``context_embedder``, ``proj_out``, ``norm_out.linear`` and the ``single_blocks.`` prefix, Flux.2
``time_in.``, ``txt_in``. Names only Flux.3 has (the mode blocks, the modulations, ``x_embedders.``,
``timestep_embedder.``, a single block's ``attn.to_out.0``/``ff.linear_in``, its original
``q_proj``/``attn_out``/``mlp_in``) decide and rule Flux.1 and Flux.2 out; Flux.1's and Flux.2's own
names rule Flux.3 out. A file of shared names only is Flux.1's unless metadata says Flux.3
(``lorakit.family``, ``modelspec.architecture``) or ``--family flux3``.

Example:
    >>> FLUX3.native_rule("content_mode_blocks.image_cond.4.attn_out")[1]
    ['mode_blocks.image_cond.4.attn.to_out.0']
    >>> FLUX3.native_rule("single_blocks.27.mlp_in")[1]
    ['single_transformer_blocks.27.ff.linear_in']
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under

MODES = ("image", "image_cond")
# original name in a block -> diffusers name (the same in mode and single blocks)
_SUBS = {"q_proj": "attn.to_q", "k_proj": "attn.to_k", "v_proj": "attn.to_v",
         "attn_out": "attn.to_out.0", "mlp_in": "ff.linear_in", "mlp_out": "ff.linear_out"}
BLOCK_SUBS = tuple(_SUBS.values())
# (original block template, diffusers block template, label, count)
_BLOCKS = (*((f"content_mode_blocks.{m}.{{i}}", f"mode_blocks.{m}.{{i}}", f"{m} mode blocks", 5)
             for m in MODES),
           ("txt_mode_blocks.{i}", "txt_mode_blocks.{i}", "text mode blocks", 5),
           ("single_blocks.{i}", "single_transformer_blocks.{i}", "single blocks", 28))
_STREAMS = (*MODES, "txt")
_TOP = {  # original name -> diffusers name, one layer each
    **{f"emb_in.{m}": f"x_embedders.{m}" for m in MODES},
    "txt_in": "context_embedder",
    "time_in.in_layer": "timestep_embedder.linear_1",
    "time_in.out_layer": "timestep_embedder.linear_2",
    "ref_time_in.in_layer": "target_timestep_embedder.linear_1",
    "ref_time_in.out_layer": "target_timestep_embedder.linear_2",
    **{f"{kind}_modulations.{s}.lin": f"{kind}_modulations.{s}.linear"
       for kind in ("early_stream", "single_stream") for s in _STREAMS},
    "final_layer.image.linear": "proj_out",
}

NATIVE = (
    *(Rule(f"{native}.{o}", under(ours, d)) for native, ours, _, _ in _BLOCKS
      for o, d in _SUBS.items()),
    *(Rule(native, (ours,)) for native, ours in _TOP.items()),
    Rule("final_layer.image.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)

_M = r"^(mode_blocks\.(image|image_cond)|txt_mode_blocks)\.\d+\."
# names only Flux.3 has, diffusers' and the original's (a hit rules Flux.1 and Flux.2 out)
FLUX3_ONLY = (_M, r"^content_mode_blocks\.",
              r"^single_transformer_blocks\.\d+\.(attn\.to_out\.0|ff\.linear_(in|out))$",
              r"^single_blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|mlp_in|mlp_out)$",
              r"^(early_stream|single_stream)_modulations\.", r"^x_embedders\.", r"^emb_in\.",
              r"^(target_)?timestep_embedder\.", r"^ref_time_in\.", r"^final_layer\.image\.")

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*(f"{ours}.{s}" for _, ours, _, _ in _BLOCKS for s in BLOCK_SUBS),
                   *_TOP.values(), "norm_out.linear"),),
    blocks=tuple(BlockType(label, ours, n, BLOCK_SUBS) for _, ours, label, n in _BLOCKS))


# Flux.1's and Flux.2's names no Flux.3 file has (double blocks, their fused single-block layers,
# their embedders and modulations; SD3's, HiDream's blocks): a hit rules Flux.3 out
NOT_FLUX3 = (r"^transformer_blocks\.", r"^double_blocks\.", r"^(double|single)_stream_blocks\.",
             r"^joint_blocks\.", r"^single_transformer_blocks\.\d+\.(proj_mlp|proj_out|norm\.linear|"
             r"attn\.to_qkv_mlp_proj|attn\.to_out)$",
             r"^single_blocks\.\d+\.(linear[12]|modulation\.)", r"^time_text_embed\.",
             r"^time_guidance_embed\.", r"^(double_stream_modulation_(img|txt)|"
             r"single_stream_modulation)\.", r"^(x_embedder|img_in|vector_in)$", r"^guidance_in\.",
             r"^final_layer\.(linear|adaLN_modulation\.1)$")

FLUX3 = Family(
    name="flux3", title="Flux.3", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "bfl", "peft"), modelspec="flux-3/lora", base_version="flux3",
    markers=FLUX3_ONLY, twin_of="flux1", anti_markers=NOT_FLUX3,
)
