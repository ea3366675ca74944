"""Krea 2 (diffusers ``Krea2Transformer2DModel``, ``Krea2Pipeline``): 28 single-stream blocks,
hidden size 6144, 48 query heads and 12 key/value heads of 128 (grouped-query attention:
``to_k``/``to_v`` are 1536 rows), a sigmoid output gate ``to_gate`` and a SwiGLU feed-forward
``ff.gate``/``ff.up``/``ff.down``; a text-fusion stage of 2 layerwise and 2 refiner blocks (2560
wide, the same layers) with a ``projector`` between them; top level ``img_in``,
``time_embed.linear_1/2``, ``time_mod_proj``, ``txt_in.linear_1/2`` and ``final_layer.linear``.

The original checkpoint (``krea-ai/krea-2``; the reference trainer's and ComfyUI's files under
``diffusion_model.``, ai-toolkit's PEFT state dict under ``base_model.model.``: what diffusers'
``_convert_non_diffusers_krea2_lora_to_diffusers`` reads) names every layer on its own, nothing
is fused: ``blocks.N.attn.wq/wk/wv/wo/gate`` (``attn.to_q/to_k/to_v/to_out.0/to_gate``),
``blocks.N.mlp.gate/up/down`` (``ff.``), ``txtfusion.layerwise_blocks.N.`` /
``txtfusion.refiner_blocks.N.`` (``text_fusion.``), and ``nn.Sequential`` indices at the top:
``first`` (``img_in``), ``tmlp.0/2`` (``time_embed.linear_1/2``), ``tproj.1`` (``time_mod_proj``),
``txtmlp.1/3`` (``txt_in.linear_1/2``), ``txtfusion.projector``, ``last.linear``
(``final_layer.linear``).

Detection: names only Krea 2 has (``attn.to_gate``, ``ff.gate``/``up``/``down``,
``text_fusion.``, ``time_mod_proj`` and every original name); a diffusers file of the attention
layers Flux.1 and SD3 spell alike is Krea 2's when its ``to_k`` is narrower than its input
(grouped-query attention, :func:`has_krea2_gqa`), else metadata or ``--family krea2`` decides.

Example:
    >>> KREA2.native_rule("blocks.27.attn.wo")[1]
    ['transformer_blocks.27.attn.to_out.0']
    >>> KREA2.native_rule("txtfusion.refiner_blocks.1.mlp.down")[1]
    ['text_fusion.refiner_blocks.1.ff.down']
"""

from __future__ import annotations

import re

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under

_ATTN = {"wq": "attn.to_q", "wk": "attn.to_k", "wv": "attn.to_v", "wo": "attn.to_out.0",
         "gate": "attn.to_gate"}
_MLP = {"gate": "ff.gate", "up": "ff.up", "down": "ff.down"}
SUBS = (*_ATTN.values(), *_MLP.values())
# (diffusers block, original block, count, label)
_BLOCKS = (("transformer_blocks", "blocks", 28, "blocks"),
           ("text_fusion.layerwise_blocks", "txtfusion.layerwise_blocks", 2,
            "text fusion layerwise blocks"),
           ("text_fusion.refiner_blocks", "txtfusion.refiner_blocks", 2,
            "text fusion refiner blocks"))
_TOP = {"first": "img_in", "tmlp.0": "time_embed.linear_1", "tmlp.2": "time_embed.linear_2",
        "tproj.1": "time_mod_proj", "txtmlp.1": "txt_in.linear_1", "txtmlp.3": "txt_in.linear_2",
        "txtfusion.projector": "text_fusion.projector", "last.linear": "final_layer.linear"}


def _block_rules(ours: str, native: str) -> tuple[Rule, ...]:
    b, n = f"{ours}.{{i}}", f"{native}.{{i}}"
    return (*(Rule(f"{n}.attn.{k}", under(b, v)) for k, v in _ATTN.items()),
            *(Rule(f"{n}.mlp.{k}", under(b, v)) for k, v in _MLP.items()))


NATIVE = (*(r for ours, native, _, _ in _BLOCKS for r in _block_rules(ours, native)),
          *(Rule(native, (ours,)) for native, ours in _TOP.items()))

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*(f"{ours}.{{i}}.{s}" for ours, _, _, _ in _BLOCKS for s in SUBS),
                   *_TOP.values()),),
    blocks=tuple(BlockType(label, f"{ours}.{{i}}", n, SUBS) for ours, _, n, label in _BLOCKS))

# names only Krea 2 has: diffusers' and the original's
KREA2_ONLY = (r"^transformer_blocks\.\d+\.(attn\.to_gate|ff\.(gate|up|down))$",
              r"^text_fusion\.", r"^time_mod_proj$", r"^time_embed\.linear_[12]$",
              r"^txt_in\.linear_[12]$",
              r"^blocks\.\d+\.(attn\.(wq|wk|wv|wo|gate)|mlp\.(gate|up|down))$", r"^txtfusion\.",
              r"^(tmlp|tproj|txtmlp)\.\d+$", r"^last\.linear$", r"^first$")

KREA2 = Family(
    name="krea2", title="Krea 2", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "bfl", "peft"), modelspec="krea-2/lora", base_version="krea2",
    markers=KREA2_ONLY,
    anti_markers=(r"^(single_transformer_blocks|double_blocks|single_blocks|joint_blocks)\.",
                  r"^transformer_blocks\.\d+\.(attn\.(add_|to_add_out)|attn[12]\.|ff\.net\.|"
                  r"ff_context\.|norm1|img_|txt_)", r"^blocks\.\d+\.(attn[12]|self_attn|cross_attn|ffn)\."),
    # Flux.1/Flux.2/SD3/HunyuanVideo/LTX-Video/Wan blocks
)

_TO_K = re.compile(r"^transformer_blocks\.\d+\.attn\.to_k$")


def has_krea2_gqa(paths, shapes) -> bool:
    """Whether a block's ``attn.to_k`` of ``paths`` is narrower than its input (Krea 2's
    grouped-query attention: 1536 of 6144; Flux.1, Flux.2 and SD3 have none);
    ``shapes``: ``{path: (out, in)}``.

    Example:
        >>> has_krea2_gqa(["transformer_blocks.0.attn.to_k"],
        ...               {"transformer_blocks.0.attn.to_k": (1536, 6144)})
        True
    """
    return any(_TO_K.match(p) and (io := shapes.get(p)) is not None and io[0] < io[1]
               for p in paths)
