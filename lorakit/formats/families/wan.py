"""Wan 2.x video transformers (2.1 T2V/I2V 1.3B/14B, 2.2): up to 40 blocks.

Native (Wan / musubi-tuner / ComfyUI) names: ``blocks.N.self_attn.q`` is ``attn1.to_q``,
``cross_attn.*`` is ``attn2.*`` (I2V's ``k_img``/``v_img`` are ``add_k_proj``/``add_v_proj``),
``ffn.0``/``ffn.2`` are ``ffn.net.0.proj``/``ffn.net.2``; no layer is fused.

Example:
    >>> WAN.native_rule("blocks.3.cross_attn.o")[1]
    ['blocks.3.attn2.to_out.0']
"""

from __future__ import annotations

from lorakit.formats.families.anima import ANIMA_ONLY
from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed
from lorakit.formats.families.clip import t5

B = "blocks.{i}"
_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
BLOCK_SUBS = (*(f"attn1.{c}" for _, c in _ATTN), *(f"attn2.{c}" for _, c in _ATTN),
              "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2")
TOP = ("condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
       "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
       "condition_embedder.time_proj", "condition_embedder.image_embedder.ff.net.0.proj",
       "condition_embedder.image_embedder.ff.net.2", "proj_out", "patch_embedding")

NATIVE = (
    *(Rule(f"{B}.self_attn.{o}", (f"{B}.attn1.{c}",)) for o, c in _ATTN),
    *(Rule(f"{B}.cross_attn.{o}", (f"{B}.attn2.{c}",)) for o, c in _ATTN),
    Rule(f"{B}.cross_attn.k_img", (f"{B}.attn2.add_k_proj",)),
    Rule(f"{B}.cross_attn.v_img", (f"{B}.attn2.add_v_proj",)),
    Rule(f"{B}.ffn.0", (f"{B}.ffn.net.0.proj",)),
    Rule(f"{B}.ffn.2", (f"{B}.ffn.net.2",)),
    Rule("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    Rule("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    Rule("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    Rule("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    Rule("time_projection.1", ("condition_embedder.time_proj",)),
    Rule("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    Rule("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
    Rule("head.head", ("proj_out",)),
)

WAN = Family(
    name="wan", title="Wan 2.x",
    components=(
        Component("transformer", "transformer", "lora_unet_",
                  known=(indexed(*(f"{B}.{s}" for s in BLOCK_SUBS), *TOP),),
                  blocks=(BlockType("blocks", B, 40, BLOCK_SUBS),)),
        t5("text_encoder", "text encoder (UMT5)", "lora_te1_")),
    rules=NATIVE, layouts=("diffusers", "kohya", "bfl", "peft"),
    modelspec="wan2.1-t2v-14b/lora", base_version="wan",
    markers=(r"^blocks\.\d+\.(attn1|attn2|self_attn|cross_attn|ffn)\.", r"^condition_embedder\.",
             r"^head\.head$", r"^(text|time)_embedding\.\d$"),
    anti_markers=ANIMA_ONLY,  # Anima's original names share the blocks.N.self_attn. prefix
)
