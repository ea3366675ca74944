"""Lumina-Image 2.0 (diffusers ``Lumina2Transformer2DModel``): 26 layers, 2 noise-refiner and
2 context-refiner blocks, hidden size 2304, 24 query heads and 8 key/value heads of 96.

The original checkpoint's names (ComfyUI's ``diffusion_model.`` files, what diffusers'
``_convert_non_diffusers_lumina2_lora_to_diffusers`` reads) fuse attention: ``layers.N.attention.qkv``
is ``attn.to_q``, ``to_k``, ``to_v`` in rows 2304 : 768 : 768 (3 : 1 : 1, grouped-query
attention); ``attention.out`` is ``attn.to_out.0``, ``feed_forward.w1/w2/w3`` are
``feed_forward.linear_1/2/3``, ``adaLN_modulation.1`` is ``norm1.linear`` (the context refiner
has none). Top level: ``t_embedder.mlp.0/2``, ``cap_embedder.1``, ``final_layer.linear`` (diffusers
``norm_out.linear_2``) and ``final_layer.adaLN_modulation.1`` (``norm_out.linear_1``, a scale
only: nothing to swap).

Example:
    >>> LUMINA2.native_rule("noise_refiner.1.attention.qkv")[1][2]
    'noise_refiner.1.attn.to_v'
    >>> LUMINA2.native_rule("layers.0.attention.qkv")[0].ratios
    (3, 1, 1)
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed
from lorakit.formats.families.ideogram4 import IDEOGRAM4_ONLY
from lorakit.formats.families.zimage import ZIMAGE_ONLY

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
CONTEXT_SUBS = (*_QKV, "attn.to_out.0", "feed_forward.linear_1", "feed_forward.linear_2",
                "feed_forward.linear_3")
LAYER_SUBS = (*CONTEXT_SUBS, "norm1.linear")  # layers and the noise refiner are modulated
_BLOCKS = (("layers", 26, LAYER_SUBS), ("noise_refiner", 2, LAYER_SUBS),
           ("context_refiner", 2, CONTEXT_SUBS))
_TOP = {"x_embedder": "x_embedder",
        "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
        "cap_embedder.1": "time_caption_embed.caption_embedder.1",
        "final_layer.adaLN_modulation.1": "norm_out.linear_1",
        "final_layer.linear": "norm_out.linear_2"}


def _block_rules(prefix: str) -> tuple[Rule, ...]:
    b = f"{prefix}.{{i}}"
    return (Rule(f"{b}.attention.qkv", tuple(f"{b}.{s}" for s in _QKV), ratios=(3, 1, 1)),
            Rule(f"{b}.attention.out", (f"{b}.attn.to_out.0",)),
            *(Rule(f"{b}.feed_forward.w{n}", (f"{b}.feed_forward.linear_{n}",)) for n in (1, 2, 3)),
            Rule(f"{b}.adaLN_modulation.1", (f"{b}.norm1.linear",)))


NATIVE = (*(r for name, _, _ in _BLOCKS for r in _block_rules(name)),
          *(Rule(native, (ours,)) for native, ours in _TOP.items()))

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*(f"{name}.{{i}}.{s}" for name, _, subs in _BLOCKS for s in subs),
                   *_TOP.values()),),
    blocks=tuple(BlockType(name.replace("_", " ") + ("" if name == "layers" else " blocks"),
                           f"{name}.{{i}}", n, subs) for name, n, subs in _BLOCKS))

LUMINA2 = Family(
    name="lumina2", title="Lumina-Image 2.0", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "bfl", "peft"), modelspec="lumina-image-2/lora",
    base_version="lumina2", anti_markers=(*ZIMAGE_ONLY, *IDEOGRAM4_ONLY),  # Z-Image's, Ideogram 4's
    markers=(r"^(noise|context)_refiner\.\d+\.", r"^time_caption_embed\.", r"^cap_embedder\.",
             r"^layers\.\d+\.(attn\.to_(q|k|v|out\.0)|attention\.(qkv|out)|norm1\.linear|"
             r"feed_forward\.linear_[123]|adaLN_modulation\.1)$"),
)
