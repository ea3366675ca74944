"""Anima (diffusers ``AnimaModularPipeline``: a ``CosmosTransformer3DModel`` of Cosmos-Predict2-2B's
shape, 28 blocks of hidden size 2048, and the ``AnimaTextConditioner``, the 6-block LLM adapter
from Qwen3 to T5-like text embeddings).

diffusers names of the transformer: ``transformer_blocks.N.attn1.to_q``/``to_k``/``to_v``/
``to_out.0`` (self-attention), ``attn2.`` (cross-attention), ``ff.net.0.proj``/``ff.net.2``, the
modulations ``norm1.linear_1``/``linear_2`` (``norm2``, ``norm3``), ``norm_out.linear_1``/
``linear_2``, ``proj_out``, ``time_embed.t_embedder.linear_1/2``, ``patch_embed.proj``. The text
conditioner (component ``text_conditioner``): ``blocks.N.self_attn.q_proj``/``k_proj``/
``v_proj``/``o_proj``, ``cross_attn.``, ``mlp.0``/``mlp.2``, ``in_proj``, ``out_proj``. The
original checkpoint's names (ComfyUI ``diffusion_model.`` files, sd-scripts'
``convert_anima_lora_to_comfy``, what diffusers' ``_convert_non_diffusers_anima_lora_to_diffusers``
reads): ``blocks.N.self_attn.q_proj``/``output_proj``, ``cross_attn.``, ``mlp.layer1``/``layer2``,
``adaln_modulation_self_attn.1``/``.2`` (and ``_cross_attn``, ``_mlp``),
``final_layer.adaln_modulation.1``/``.2``, ``final_layer.linear``, ``t_embedder.1.linear_1``,
``x_embedder.proj.1``, one diffusers layer each (Cosmos' ``(shift, scale)`` order is diffusers'
too: nothing is swapped); the text conditioner under ``diffusion_model.llm_adapter.`` with the
same names as in diffusers.

Detection: LTX-Video shares the block names ``attn1.``, ``attn2.``, ``ff.net.`` (and SD3
``attn2.``, Wan the ``blocks.N.self_attn.`` prefix of the original names): names only Anima has
(``norm1.linear_1``, ``norm_out.linear_1``, ``time_embed.t_embedder.``, ``patch_embed.proj``, the
original ``q_proj``/``output_proj``/``mlp.layer1``/``adaln_modulation_*``, ``t_embedder.1.``,
``x_embedder.proj.1``) or a ``text_conditioner`` component decide and rule the others out; a file
of shared block names only is LTX-Video's unless metadata says Anima or ``--family anima``.
Cosmos Predict2 files (the same transformer) are read as Anima.

Example:
    >>> ANIMA.native_rule("blocks.3.adaln_modulation_mlp.2")[1]
    ['transformer_blocks.3.norm3.linear_2']
    >>> ANIMA.knows("text_conditioner", "blocks.5.cross_attn.o_proj")
    True
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under

B, NB = "transformer_blocks.{i}", "blocks.{i}"
_ATTN = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "output_proj": "to_out.0"}
_BLOCK = {  # original name in a block -> diffusers name
    **{f"self_attn.{o}": f"attn1.{d}" for o, d in _ATTN.items()},
    **{f"cross_attn.{o}": f"attn2.{d}" for o, d in _ATTN.items()},
    "mlp.layer1": "ff.net.0.proj", "mlp.layer2": "ff.net.2",
    **{f"adaln_modulation_{o}.{j}": f"norm{n}.linear_{j}"
       for n, o in ((1, "self_attn"), (2, "cross_attn"), (3, "mlp")) for j in (1, 2)},
}
BLOCK_SUBS = tuple(_BLOCK.values())
_TOP = {"final_layer.adaln_modulation.1": "norm_out.linear_1",
        "final_layer.adaln_modulation.2": "norm_out.linear_2",
        "final_layer.linear": "proj_out",
        "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
        "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
        "x_embedder.proj.1": "patch_embed.proj"}

NATIVE = (*(Rule(f"{NB}.{o}", under(B, d)) for o, d in _BLOCK.items()),
          *(Rule(o, (d,)) for o, d in _TOP.items()))

_TC_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
TC_SUBS = (*(f"self_attn.{p}" for p in _TC_ATTN), *(f"cross_attn.{p}" for p in _TC_ATTN),
           "mlp.0", "mlp.2")

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*under(B, *BLOCK_SUBS), *_TOP.values()),),
    blocks=(BlockType("blocks", B, 28, BLOCK_SUBS),))
TEXT_CONDITIONER = Component(
    "text_conditioner", "text conditioner (LLM adapter)", "lora_llm_adapter_",
    known=(indexed(*under(NB, *TC_SUBS), "in_proj", "out_proj"),),
    blocks=(BlockType("llm adapter blocks", NB, 6, TC_SUBS),))

_NB = r"^blocks\.\d+\."
# names only Anima has, diffusers' and the original's (a hit rules LTX-Video, SD3, Wan out)
ANIMA_ONLY = (r"^transformer_blocks\.\d+\.norm[123]\.linear_[12]$", r"^norm_out\.linear_[12]$",
              r"^time_embed\.t_embedder\.", r"^patch_embed\.proj$",
              _NB + r"(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj)$",
              _NB + r"mlp\.layer[12]$", _NB + r"adaln_modulation_(self_attn|cross_attn|mlp)\.",
              r"^final_layer\.adaln_modulation\.[12]$", r"^t_embedder\.1\.linear_[12]$",
              r"^x_embedder\.proj\.1$")
# other families' names no Anima file has: LTX-Video's top layers, SD3's, Flux's and Qwen's
# blocks, Wan's original and diffusers names, HiDream's and HunyuanVideo's blocks
NOT_ANIMA = (r"^proj_in$", r"^caption_projection\.", r"^time_embed\.(emb\.|linear$)",
             r"^transformer_blocks\.\d+\.(attn\.|ff_context\.|norm1\.linear$|img_|txt_)",
             r"^joint_blocks\.", r"^(double|single)_(stream_)?blocks\.",
             r"^single_transformer_blocks\.", r"^blocks\.\d+\.(attn1|attn2|ffn)\.",
             _NB + r"(self_attn|cross_attn)\.[qkvo]$", r"^condition_embedder\.",
             r"^(x|y)_embedder\.(?!proj\.1$)", r"^t_embedder\.(?!1\.linear_[12]$)",
             r"^pos_embed\.proj$", r"^context_embedder\.")

ANIMA = Family(
    name="anima", title="Anima", components=(TRANSFORMER, TEXT_CONDITIONER), rules=NATIVE,
    layouts=("diffusers", "bfl", "peft"), modelspec="anima/lora", base_version="anima",
    markers=ANIMA_ONLY, twin_of="ltxvideo", anti_markers=NOT_ANIMA,
)
