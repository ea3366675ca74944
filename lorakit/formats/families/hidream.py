"""HiDream-I1 (diffusers ``HiDreamImageTransformer2DModel``): 16 double-stream and 32
single-stream blocks, each with a mixture-of-experts feed-forward (4 routed experts and a shared
one, SwiGLU ``w1``/``w2``/``w3``; the router ``gate`` is no Linear and takes no LoRA).

The original checkpoint uses diffusers' names (``double_stream_blocks.N.block.attn1.to_q``, the
text stream's ``to_q_t``), so ComfyUI files are ``diffusion_model.`` + those names, which is all
diffusers' ``_convert_non_diffusers_hidream_lora_to_diffusers`` strips; no layer is fused.

Example:
    >>> HIDREAM.denoiser.knows("single_stream_blocks.31.block.ff_i.experts.3.w2")
    True
    >>> HIDREAM.denoiser.knows("double_stream_blocks.16.block.attn1.to_q")
    False
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, indexed

EXPERTS = 4
_SWIGLU = ("w1", "w2", "w3")
_FF_I = (*(f"block.ff_i.shared_experts.{w}" for w in _SWIGLU),
         *(f"block.ff_i.experts.{e}.{w}" for e in range(EXPERTS) for w in _SWIGLU))
_ATTN = tuple(f"block.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out"))
SINGLE_SUBS = ("block.adaLN_modulation.1", *_ATTN, *_FF_I)
DOUBLE_SUBS = (*SINGLE_SUBS, *(f"{p}_t" for p in _ATTN),  # the text stream's attention
               *(f"block.ff_t.{w}" for w in _SWIGLU))
D, S = "double_stream_blocks.{i}", "single_stream_blocks.{i}"
_TOP = ("t_embedder.timestep_embedder.linear_1", "t_embedder.timestep_embedder.linear_2",
        "p_embedder.pooled_embedder.linear_1", "p_embedder.pooled_embedder.linear_2",
        "x_embedder.proj", "final_layer.linear", "final_layer.adaLN_modulation.1",
        "caption_projection.{i}.linear")  # one projection per Llama layer used, and T5's

HIDREAM = Family(
    name="hidream", title="HiDream-I1",
    components=(Component("transformer", "transformer", "lora_unet_", known=(indexed(
        *(f"{D}.{s}" for s in DOUBLE_SUBS), *(f"{S}.{s}" for s in SINGLE_SUBS), *_TOP),),
        blocks=(BlockType("double blocks", D, 16, DOUBLE_SUBS),
                BlockType("single blocks", S, 32, SINGLE_SUBS))),),
    layouts=("diffusers", "bfl", "peft"), modelspec="hidream-i1/lora", base_version="hidream",
    markers=(r"^(double|single)_stream_blocks\.\d+\.block\.", r"^caption_projection\.\d+\.",
             r"^p_embedder\.pooled_embedder\.", r"^t_embedder\.timestep_embedder\."),
)
