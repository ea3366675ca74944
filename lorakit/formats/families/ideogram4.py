"""Ideogram 4 (diffusers ``Ideogram4Transformer2DModel``, ``Ideogram4Pipeline``): 34 layers,
hidden size 4608, 18 heads of 256 (as many key/value heads: no grouped-query attention), a SwiGLU
feed-forward of 12288 and one ``adaln_modulation`` (512 -> 4 x 4608) per layer.

diffusers keeps the original module tree but splits attention: ``layers.N.attention.to_q``/
``to_k``/``to_v``/``to_out.0``, ``feed_forward.w1/w2/w3``, ``adaln_modulation``; top level
``input_proj``, ``llm_cond_proj``, ``t_embedding.mlp_in``/``mlp_out``, ``adaln_proj``,
``final_layer.linear`` and ``final_layer.adaln_modulation``. The original checkpoint (ai-toolkit
and ComfyUI files under ``diffusion_model.``, or ``conditional_transformer.`` for the pipeline's
conditional transformer; what diffusers' ``_convert_non_diffusers_ideogram4_lora_to_diffusers``
reads) fuses attention: ``attention.qkv`` is ``to_q``, ``to_k``, ``to_v`` in equal row blocks
(the original views its output as ``(3, heads, head_dim)``: q, k, v of 4608 rows each) and
``attention.o`` is ``attention.to_out.0``; every other name is the same.

Detection: Lumina 2 and Z-Image share names with it (``layers.N.attention.qkv``,
``feed_forward.w1``; Z-Image's diffusers ``attention.to_q``). Ideogram-only names
(``adaln_modulation``, ``attention.o``, ``input_proj``, ``llm_cond_proj``, ``t_embedding.``,
``adaln_proj``, ``final_layer.adaln_modulation``) rule both out; a file of shared names only is
Ideogram 4's when its metadata says so, when its attention is 4608 wide
(:func:`has_ideogram4_width`: Z-Image is 3840, Lumina 2 2304) or with ``--family ideogram4``.

Example:
    >>> IDEOGRAM4.native_rule("layers.33.attention.qkv")[1][1]
    'layers.33.attention.to_k'
    >>> IDEOGRAM4.native_rule("layers.0.attention.o")[1]
    ['layers.0.attention.to_out.0']
"""

from __future__ import annotations

import re

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under

HIDDEN = 4608  # 18 heads of 256
_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")
_FF = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
LAYER_SUBS = (*_QKV, "attention.to_out.0", *_FF, "adaln_modulation")
_TOP = ("input_proj", "llm_cond_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj",
        "final_layer.linear", "final_layer.adaln_modulation")
_L = "layers.{i}"

NATIVE = (Rule(f"{_L}.attention.qkv", under(_L, *_QKV)),  # equal thirds: q, k, v
          Rule(f"{_L}.attention.o", under(_L, "attention.to_out.0")),
          *(Rule(f"{_L}.{s}", under(_L, s)) for s in (*_FF, "adaln_modulation")),
          *(Rule(name, (name,)) for name in _TOP))

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*(f"{_L}.{s}" for s in LAYER_SUBS), *_TOP),),
    blocks=(BlockType("layers", _L, 34, LAYER_SUBS),))

# names only Ideogram 4 has (a hit rules Lumina 2 and Z-Image out)
IDEOGRAM4_ONLY = (r"^layers\.\d+\.(adaln_modulation|attention\.o)$",
                  r"^(input_proj|llm_cond_proj|adaln_proj)$", r"^t_embedding\.mlp_(in|out)$",
                  r"^final_layer\.adaln_modulation$")
# Lumina 2's and Z-Image's names Ideogram 4 does not have
_OTHERS = (r"^(noise|context)_refiner\.",
           r"^layers\.\d+\.(adaLN_modulation\.|attention\.out$|attn\.|norm1\.|feed_forward\.linear_)",
           r"^all_(x_embedder|final_layer)\.", r"^(t_embedder|cap_embedder|time_caption_embed)\.",
           r"^x_embedder$", r"^final_layer\.adaLN_modulation\.")

IDEOGRAM4 = Family(
    name="ideogram4", title="Ideogram 4", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "bfl", "peft"), modelspec="ideogram-4/lora", base_version="ideogram4",
    markers=IDEOGRAM4_ONLY, anti_markers=_OTHERS, twin_of=("lumina2", "zimage"),
)

_WIDE = re.compile(r"^layers\.\d+\.(attention\.(qkv|to_[qkv]|to_out\.0|o)|feed_forward\.w[13])$")


def has_ideogram4_width(paths, shapes) -> bool:
    """Whether an attention or feed-forward input layer of ``paths`` reads Ideogram 4's width
    (4608; a fused ``attention.qkv`` 3 x as many rows); ``shapes``: ``{path: (out, in)}``.

    Example:
        >>> has_ideogram4_width(["layers.0.attention.qkv"],
        ...                     {"layers.0.attention.qkv": (3 * 4608, 4608)})
        True
        >>> has_ideogram4_width(["layers.0.attention.to_q"], {"layers.0.attention.to_q": (24, 24)})
        False
    """
    for p in paths:
        io = shapes.get(p)
        if io is None or not _WIDE.match(p) or io[1] != HIDDEN:
            continue
        if not p.endswith(".qkv") or io[0] == 3 * HIDDEN:
            return True
    return False
