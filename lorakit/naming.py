"""Module-path conventions shared by the formats: diffusion components and kohya names.

Module keys are dotted paths (``down_blocks.0.attentions.0.proj_in``). Diffusion formats put the
pipeline component first (``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``).
kohya writes the same path with ``_`` for ``.`` behind a component prefix (``lora_unet_``,
``lora_te_``, ``lora_te1_``, ``lora_te2_``). Joining with ``_`` is lossless one way; the way back
(:func:`kohya_to_dotted`) splits on ``_`` and re-joins the words of known multi-word segment names
(``transformer_blocks``, ``to_q``, ``q_proj``, ...). A kohya -> kohya round trip never depends on
that guess, because the dotted name joins back to the very same kohya name.

Example:
    >>> kohya_to_dotted("down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0")
    'down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0'
    >>> dotted_to_kohya("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")
    'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
"""

from __future__ import annotations

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior",
              "connectors",  # LTX-2's text connectors
              "transformer_ref",  # MiniMax-H3's second partition
              "text_conditioner")  # Anima's LLM adapter

# kohya prefix -> component. Order matters: longest first.
KOHYA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_transformer_", "transformer"),
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lora_prior_", "prior"),
)

# Segment names that contain underscores, in the diffusers / transformers module trees that kohya
# files name. Longest match wins when re-joining.
_COMPOUND = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "proj_attn", "proj_mlp", "time_emb_proj", "conv_shortcut", "conv_in",
    "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "gate_proj",
    "up_proj", "down_proj", "embed_tokens", "lm_head", "text_projection", "final_layer_norm",
    "self_attention", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj",
    "c_fc", "q_lin", "k_lin", "v_lin", "out_lin", "input_blocks", "output_blocks", "middle_block",
    "norm_out", "time_text_embed", "timestep_embedder", "text_embedder",
    "guidance_embedder", "context_embedder", "x_embedder", "norm1_context", "ff_context",
    "norm_added_q", "norm_added_k", "norm_q", "norm_k", "single_blocks",
    "double_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "pos_embed", "patch_embed", "caption_projection", "adaln_single", "attn_out",
    "resnets", "attentions", "downsamplers", "upsamplers",
    # native checkpoint names (SD3/SAI MMDiT, Wan, SGM UNet, Flux XLabs processors)
    "joint_blocks", "x_block", "context_block", "t_embedder", "y_embedder",
    "final_layer", "cross_attn", "k_img", "v_img", "text_embedding", "time_projection",
    "img_emb", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed",
    "label_emb", "qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2", "qkv_lora", "proj_lora",
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer",
    "adaLN_modulation",
    # Flux.2: shared modulations, fused single-block layers, SwiGLU feed-forwards
    "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation",
    "to_qkv_mlp_proj", "linear_in", "linear_out", "time_guidance_embed",
    # Z-Image: refiner blocks, feed-forwards, per-patch-size embedders
    "noise_refiner", "context_refiner", "feed_forward", "cap_embedder", "all_x_embedder",
    "all_final_layer",
    # LLM families: T5 v1.1 / Flan-T5 gated FFN, Phi-3, Mixtral, Qwen2-MoE, GPT-J, GPT-NeoX,
    # Whisper/BART, Mamba, CLIP vision, LLaVA-style wrappers
    "wi_0", "wi_1", "qkv_proj", "gate_up_proj", "block_sparse_moe", "shared_expert", "fc_in",
    "fc_out", "gpt_neox", "encoder_attn", "in_proj", "x_proj", "dt_proj", "vision_model",
    "language_model", "vision_tower", "multi_modal_projector",
}
_MAX_WORDS = 4


def split_component(key: str) -> tuple[str | None, str]:
    """Split ``unet.down_blocks.0...`` into ``("unet", "down_blocks.0...")``.

    Example:
        >>> split_component("text_encoder.text_model.encoder.layers.0.mlp.fc1")
        ('text_encoder', 'text_model.encoder.layers.0.mlp.fc1')
        >>> split_component("model.layers.0.q_proj")
        (None, 'model.layers.0.q_proj')
    """
    head, _, rest = key.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return None, key


def kohya_to_dotted(name: str) -> str:
    """Turn a kohya module name (without prefix) back into a dotted module path.

    Digits are their own segments; runs of words are joined with ``_`` where they form a known
    compound segment name, longest first.

    Example:
        >>> kohya_to_dotted("model_layers_3_self_attn_q_proj")
        'model.layers.3.self_attn.q_proj'
    """
    words = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(words):
        joined = None
        for n in range(min(_MAX_WORDS, len(words) - i), 1, -1):
            cand = "_".join(words[i:i + n])
            if cand in _COMPOUND:
                joined, i = cand, i + n
                break
        if joined is None:
            joined, i = words[i], i + 1
        out.append(joined)
    return ".".join(out)


def kohya_prefix_for(component: str | None, components: list[str]) -> str:
    """The kohya prefix for a component (``lora_te1_`` when a second text encoder is present)."""
    if component is None:
        return "lora_"
    if component == "text_encoder":
        return "lora_te1_" if "text_encoder_2" in components else "lora_te_"
    for prefix, comp in KOHYA_PREFIXES:
        if comp == component:
            return prefix
    return f"lora_{component}_"


def dotted_to_kohya(component: str | None, path: str, components: list[str] | None = None) -> str:
    """The kohya name of a module (no ``.lora_down.weight`` suffix)."""
    return kohya_prefix_for(component, components or []) + path.replace(".", "_")


def split_kohya_name(name: str) -> tuple[str | None, str]:
    """Split ``lora_unet_down_blocks_0...`` into ``("unet", "down_blocks_0...")``.

    A plain ``lora_`` prefix (LLM files) gives no component. Returns ``(None, "")`` if the name does
    not start with ``lora_``.
    """
    for prefix, comp in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return comp, name[len(prefix):]
    if name.startswith("lora_"):
        return None, name[len("lora_"):]
    return None, ""
