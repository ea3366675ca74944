"""MiniMax-H3 (diffusers ``MiniMaxH3Transformer3DModel``, ``MiniMaxH3ModularPipeline``): 50
transformer blocks over one packed video + audio + text sequence, a 2-block text token refiner,
hidden size 5376, 56 heads of 128 (its default config).

diffusers names: ``transformer_blocks.N.attn.to_q``/``to_k``/``to_v``/``to_out.0``,
``ff.net.0.proj``/``ff.net.2`` (SwiGLU), ``adaln_proj.linear``; the refiner's
``token_refiner.refiner_blocks.N.*`` (no AdaLN); ``proj_in``, ``audio_proj_in``,
``context_embedder``, ``time_embedder.linear_1``/``linear_2``, ``norm_out.linear``, ``proj_out``,
``audio_proj_out``. The original checkpoint's names (ai-toolkit's ``diffusion_model.`` files,
the reference code's and ComfyUI's prefix-less ones, musubi-tuner's kohya ``lora_unet_`` files,
what diffusers' ``_convert_non_diffusers_minimax_h3_lora_to_diffusers`` reads) fuse attention:
``blocks.N.attn.qkv_proj`` is ``to_q``, ``to_k``, ``to_v`` in equal row blocks (stacked
``[q; k; v]``), ``attn.out_proj`` is ``to_out.0``; ``mlp.fc1`` is ``ff.net.0.proj`` with its two
output halves swapped (the checkpoint's ``[gate; value]``, diffusers' ``[value; gate]``),
``mlp.fc2`` is ``ff.net.2``; ``video_patch_proj``, ``audio_patch_proj``, ``condition_proj``,
``time_embedder.proj_in``/``proj_out`` and ``final_layer.adaln_proj.linear``/``video_out``/
``audio_out`` are the top layers (``final_layer``'s modulation is ``(shift, scale)`` in both:
no swap). DiffSynth-Studio's files (peft's ``.default.`` infix over the original names) keep the
raw checkpoint's per-head-interleaved qkv: :mod:`lorakit.formats.diffsynth` reorders it.
The pipeline's second partition, ``transformer_ref`` (same module names), is a component of its
own in diffusers and PEFT files; no kohya or ComfyUI producer spells it.

Example:
    >>> MINIMAX_H3.native_rule("blocks.3.attn.qkv_proj")[1][2]
    'transformer_blocks.3.attn.to_v'
    >>> MINIMAX_H3.native_rule("token_refiner.blocks.1.mlp.fc1")[0].swap
    'always'
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed, under

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
REFINER_SUBS = (*_QKV, "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
BLOCK_SUBS = (*REFINER_SUBS, "adaln_proj.linear")
D, R = "transformer_blocks.{i}", "token_refiner.refiner_blocks.{i}"
_TOP = {  # original name -> diffusers name, one layer each
    "video_patch_proj": "proj_in",
    "audio_patch_proj": "audio_proj_in",
    "condition_proj": "context_embedder",
    "time_embedder.proj_in": "time_embedder.linear_1",
    "time_embedder.proj_out": "time_embedder.linear_2",
    "final_layer.adaln_proj.linear": "norm_out.linear",
    "final_layer.video_out": "proj_out",
    "final_layer.audio_out": "audio_proj_out",
}


def _block_rules(native: str, ours: str, adaln: bool) -> tuple[Rule, ...]:
    rules = (Rule(f"{native}.attn.qkv_proj", under(ours, *_QKV)),
             Rule(f"{native}.attn.out_proj", under(ours, "attn.to_out.0")),
             Rule(f"{native}.mlp.fc1", under(ours, "ff.net.0.proj"), swap="always"),
             Rule(f"{native}.mlp.fc2", under(ours, "ff.net.2")))
    return (*rules, Rule(f"{native}.adaln_proj.linear", under(ours, "adaln_proj.linear"))) \
        if adaln else rules


NATIVE = (*_block_rules("blocks.{i}", D, True),
          *_block_rules("token_refiner.blocks.{i}", R, False),
          *(Rule(native, (ours,)) for native, ours in _TOP.items()))

_KNOWN = (indexed(*under(D, *BLOCK_SUBS), *under(R, *REFINER_SUBS), *_TOP.values()),)
_BLOCKS = (BlockType("blocks", D, 50, BLOCK_SUBS),
           BlockType("token refiner blocks", R, 2, REFINER_SUBS))
TRANSFORMER = Component("transformer", "transformer", "lora_unet_", known=_KNOWN, blocks=_BLOCKS)
# the ref2va workflow's partition: the same modules, diffusers names only, no kohya spelling
TRANSFORMER_REF = Component("transformer_ref", "reference transformer", "", known=_KNOWN,
                            blocks=_BLOCKS)

MINIMAX_H3 = Family(
    name="minimaxh3", title="MiniMax-H3", components=(TRANSFORMER, TRANSFORMER_REF), rules=NATIVE,
    layouts=("diffusers", "kohya", "bfl", "peft"), modelspec="minimax-h3/lora",
    base_version="minimax_h3",
    markers=(r"^(transformer_blocks\.\d+\.adaln_proj\.linear|token_refiner\.refiner_blocks\.)",
             r"^(blocks|token_refiner\.blocks)\.\d+\.(attn\.(qkv|out)_proj|mlp\.fc[12]|"
             r"adaln_proj\.linear)$",
             r"^(video|audio)_patch_proj$", r"^condition_proj$", r"^time_embedder\.proj_(in|out)$",
             r"^final_layer\.(adaln_proj\.linear|video_out|audio_out)$"),
    # (its audio_proj_in/out are known, not markers: LTX-2 has an audio_proj_in too)
)
