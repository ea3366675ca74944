"""ACE-Step 1.5 (diffusers ``AceStepTransformer1DModel``, ``AceStepPipeline``): the music DiT
decoder, 24 layers of self-attention, cross-attention and a gated MLP (its default config;
hidden 2048, 16 query and 8 key/value heads of 128).

diffusers names: ``layers.N.self_attn.to_q``/``to_k``/``to_v``/``to_out.0`` (and
``cross_attn.*``), ``layers.N.mlp.gate_proj``/``up_proj``/``down_proj``,
``time_embed.linear_1``/``linear_2``/``time_proj`` (and ``time_embed_r.*``),
``condition_embedder``. The original repository trains PEFT on its decoder, whose attention
projections are ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (``base_model.model.layers.N.
self_attn.q_proj.lora_A.weight``, what diffusers' ``_convert_non_diffusers_ace_step_lora_to_
diffusers`` reads); every other name is the same. That is this family's *native* naming, read
and written as the ``peftnative`` layout (a PEFT folder); no layer is fused.

Detection: ``layers.N.self_attn.q_proj`` is also a Llama/Qwen model's PEFT naming, and lorakit
keeps reading LLM folders as no family. So the original names alone are ACE-Step only when they
cannot be an LLM's: a layer with both ``self_attn`` and ``cross_attn`` projections (Mllama's
cross-attention layers have no self-attention; no decoder-only LLM has ``cross_attn``)
(:func:`has_acestep_native_names`), else metadata (``lorakit.family``) or ``--family acestep``.
The diffusers names (``to_q``, ``time_embed_r.``, ``condition_embedder``) are ACE-Step's.

Example:
    >>> ACESTEP.native_rule("layers.3.cross_attn.o_proj")[1]
    ['layers.3.cross_attn.to_out.0']
    >>> has_acestep_native_names(["layers.0.self_attn.q_proj", "layers.0.cross_attn.q_proj"])
    True
    >>> has_acestep_native_names(["layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"])
    False
"""

from __future__ import annotations

import re

from lorakit.formats.families.base import BlockType, Component, Family, Rule, indexed

L = "layers.{i}"
_PROJ = (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("o_proj", "to_out.0"))
_ATTNS = ("self_attn", "cross_attn")
LAYER_SUBS = (*(f"{a}.{c}" for a in _ATTNS for _, c in _PROJ),
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TOP = ("time_embed.linear_1", "time_embed.linear_2", "time_embed.time_proj",
       "time_embed_r.linear_1", "time_embed_r.linear_2", "time_embed_r.time_proj",
       "condition_embedder")

NATIVE = (*(Rule(f"{L}.{a}.{o}", (f"{L}.{a}.{c}",)) for a in _ATTNS for o, c in _PROJ),
          *(Rule(f"{L}.mlp.{p}", (f"{L}.mlp.{p}",)) for p in ("gate_proj", "up_proj", "down_proj")),
          *(Rule(name, (name,)) for name in TOP))  # the same names

TRANSFORMER = Component(
    "transformer", "transformer", "lora_unet_",
    known=(indexed(*(f"{L}.{s}" for s in LAYER_SUBS), *TOP),),
    blocks=(BlockType("layers", L, 24, LAYER_SUBS),))

ACESTEP = Family(
    name="acestep", title="ACE-Step 1.5", components=(TRANSFORMER,), rules=NATIVE,
    layouts=("diffusers", "peft", "peftnative"), modelspec="ace-step-v1.5/lora",
    base_version="ace_step_v1_5",
    markers=(r"^layers\.\d+\.(self_attn|cross_attn)\.(to_[qkv]|to_out\.0)$",
             r"^time_embed_r\.(linear_[12]|time_proj)$", r"^time_embed\.time_proj$",
             r"^condition_embedder$"),
    # (time_embed.linear_1/2 are known, not markers: Krea 2 has them too)
)

_NATIVE_ATTN = re.compile(r"^layers\.(\d+)\.(self_attn|cross_attn)\.[qkvo]_proj$")


def has_acestep_native_names(paths) -> bool:
    """Whether ``paths`` (no component) hold one layer's ``self_attn`` and ``cross_attn``
    projections in the original names: ACE-Step's decoder, not an LLM."""
    seen: dict[str, set[str]] = {}
    for p in paths:
        if m := _NATIVE_ATTN.match(p):
            seen.setdefault(m[1], set()).add(m[2])
    return any(len(kinds) == 2 for kinds in seen.values())
