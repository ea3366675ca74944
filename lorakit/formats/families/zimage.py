"""Z-Image (diffusers ``ZImageTransformer2DModel``, ``ZImagePipeline``): 30 layers, 2 noise-refiner
and 2 context-refiner blocks (its default config), hidden size 3840, 30 heads of 128 (as many
key/value heads: no grouped-query attention).

diffusers keeps the original module tree: ``layers.N.attention.to_q``/``to_k``/``to_v``/
``to_out.0``, ``feed_forward.w1/w2/w3``, ``adaLN_modulation.0`` (the context refiner has none),
``t_embedder.mlp.0/2``, ``cap_embedder.1`` and, per patch size, ``all_x_embedder.2-1`` and
``all_final_layer.2-1.linear``/``.adaLN_modulation.1``. The original checkpoint (ComfyUI's
``diffusion_model.`` files, what diffusers' ``_convert_non_diffusers_z_image_lora_to_diffusers``
reads) fuses attention: ``attention.qkv`` is ``to_q``, ``to_k``, ``to_v`` in equal row blocks and
``attention.out`` is ``attention.to_out.0``; every other name is the same. kohya files spell
the diffusers paths with underscores (``lora_unet_layers_0_attention_to_q``,
``lora_unet_all_x_embedder_2-1``) + ``lora_down``/``lora_up``/``.alpha``.

Detection: Lumina-Image 2.0 shares the original block names (``layers.N.attention.qkv``,
``feed_forward.w1``, ``t_embedder.mlp.0``, ``cap_embedder.1``). Z-Image-only names (diffusers'
``attention.to_q``, ``adaLN_modulation.0``, ``all_x_embedder.``, ``all_final_layer.``) rule
Lumina 2 out; a file of shared names only is Lumina 2's unless metadata says Z-Image, its fused
qkv is 3 x its input (Lumina 2's 3 : 1 : 1 is 5/3 x) or ``--family zimage``.

Example:
    >>> ZIMAGE.native_rule("noise_refiner.1.attention.qkv")[1][2]
    'noise_refiner.1.attention.to_v'
    >>> ZIMAGE.native_rule("layers.0.attention.out")[1]
    ['layers.0.attention.to_out.0']
"""

from __future__ import annotations

import re

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed
from lorakit.formats.families.ideogram4 import IDEOGRAM4_ONLY

_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")
_FF = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
CONTEXT_SUBS = (*_QKV, "attention.to_out.0", *_FF)
LAYER_SUBS = (*CONTEXT_SUBS, "adaLN_modulation.0")  # layers and the noise refiner are modulated
_BLOCKS = (("layers", 30, LAYER_SUBS), ("noise_refiner", 2, LAYER_SUBS),
           ("context_refiner", 2, CONTEXT_SUBS))
_TOP = ("all_x_embedder.2-1", "all_final_layer.2-1.linear",
        "all_final_layer.2-1.adaLN_modulation.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
        "cap_embedder.1")


def _block_rules(prefix: str) -> tuple[Rule, ...]:
    b = f"{prefix}.{{i}}"
    same = (*_FF, "adaLN_modulation.0")
    return (Rule(f"{b}.attention.qkv", tuple(f"{b}.{s}" for s in _QKV)),
            Rule(f"{b}.attention.out", (f"{b}.attention.to_out.0",)),
            *(Rule(f"{b}.{s}", (f"{b}.{s}",)) for s in same))


NATIVE = (*(r for name, _, _ in _BLOCKS for r in _block_rules(name)),
          *(Rule(name, (name,)) for name in _TOP))

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*(f"{name}.{{i}}.{s}" for name, _, subs in _BLOCKS for s in subs), *_TOP),),
    blocks=tuple(BlockType(name.replace("_", " ") + ("" if name == "layers" else " blocks"),
                           f"{name}.{{i}}", n, subs) for name, n, subs in _BLOCKS))

_B = r"^(layers|noise_refiner|context_refiner)\.\d+\."
# names only Z-Image has (a hit rules Lumina 2 out)
ZIMAGE_ONLY = (_B + r"(attention\.(to_[qkv]|to_out\.0)|adaLN_modulation\.0)$",
               r"^all_(x_embedder|final_layer)\.")
# names only Lumina 2 has (its diffusers names, its own modulation and top layers)
LUMINA2_ONLY = (_B + r"(attn\.|norm1\.linear$|feed_forward\.linear_|adaLN_modulation\.1$)",
                r"^time_caption_embed\.", r"^final_layer\.", r"^x_embedder$")

ZIMAGE = Family(
    name="zimage", title="Z-Image", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "kohya", "bfl", "peft"), modelspec="z-image/lora", base_version="zimage",
    markers=ZIMAGE_ONLY, twin_of="lumina2", anti_markers=(*LUMINA2_ONLY, *IDEOGRAM4_ONLY),
)

_QKV_RE = re.compile(_B + r"attention\.qkv$")


def has_zimage_proportions(paths, shapes) -> bool:
    """Whether a fused ``attention.qkv`` of ``paths`` is 3 x its input (Z-Image's equal q, k, v;
    Lumina 2's 3 : 1 : 1 is 5/3 x); ``shapes``: ``{path: (out, in)}``.

    Example:
        >>> has_zimage_proportions(["layers.0.attention.qkv"], {"layers.0.attention.qkv": (72, 24)})
        True
    """
    for p in paths:
        io = shapes.get(p)
        if io is not None and _QKV_RE.match(p) and io[0] == 3 * io[1]:
            return True
    return False
