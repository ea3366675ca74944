"""Tiny diffusion models built from config (real block structure and module names, tiny widths)
and diffusers' own LoRA loaders as the judge of what a file applies.

``applied(model)`` reads back, from the PEFT layers diffusers injected, each layer's update
``scaling * B @ A``: what the loader applies. Import only after ``pytest.importorskip("diffusers")``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", module="diffusers")


def flux(width: int = 16, double: int = 1, single: int = 1):
    from diffusers import FluxTransformer2DModel

    heads = width // 8
    with torch.device("meta"):  # weights are never read: only the LoRA layers are compared
        m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=double,
                                   num_single_layers=single, attention_head_dim=8 if width < 1024
                                   else 128, num_attention_heads=heads if width < 1024 else 24,
                                   joint_attention_dim=16, pooled_projection_dim=8,
                                   guidance_embeds=True, axes_dims_rope=(2, 2, 4) if width < 1024
                                   else (16, 56, 56))
    return m.to_empty(device="cpu")


def flux_real_single(n_single: int, materialise: tuple[int, ...]):
    """Flux.1-dev's width with ``n_single`` single blocks on the meta device; only the
    ``proj_out`` of the listed blocks gets memory (the layers a sparse LoRA adapts)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=0,
                                   num_single_layers=n_single, attention_head_dim=128,
                                   num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True,
                                   axes_dims_rope=(16, 56, 56))
    for i in materialise:
        m.single_transformer_blocks[i].proj_out.to_empty(device="cpu")
    return m


def sd3():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4,
                                  dual_attention_layers=(0,))
    return m.to_empty(device="cpu")


def wan():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                                  ffn_dim=32, num_layers=2)
    return m.to_empty(device="cpu")


def qwen():
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    return m.to_empty(device="cpu")


def ltx():
    from diffusers import LTXVideoTransformer3DModel

    with torch.device("meta"):
        m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                       attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                                       caption_channels=16)
    return m.to_empty(device="cpu")


def hunyuan(width: int = 16, double: int = 1, single: int = 1, refiner: int = 1):
    """HunyuanVideo with its real structure (double, single and token-refiner blocks), heads
    of 8."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        m = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=width // 8, attention_head_dim=8,
            num_layers=double, num_single_layers=single, num_refiner_layers=refiner,
            patch_size=1, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
            rope_axes_dim=(2, 2, 4))
    return m.to_empty(device="cpu")


def hunyuan_real(materialise: tuple[str, ...]):
    """HunyuanVideo at its real width (3072, 24 heads of 128) with one double and one single
    block on the meta device; only the listed modules get memory (the layers a file adapts)."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        m = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=24, attention_head_dim=128,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
            patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
            rope_axes_dim=(16, 56, 56))
    names = dict(m.named_modules())
    for n in materialise:
        names[n].to_empty(device="cpu")
    return m


def flux2(width: int = 16, double: int = 1, single: int = 1):
    """Flux.2 with its real structure (double blocks with SwiGLU feed-forwards, single blocks of
    one fused ``to_qkv_mlp_proj`` and ``to_out``, shared modulations), heads of 8."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        m = Flux2Transformer2DModel(
            patch_size=1, in_channels=4, num_layers=double, num_single_layers=single,
            attention_head_dim=8, num_attention_heads=width // 8, joint_attention_dim=24,
            timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True)
    return m.to_empty(device="cpu")


def lumina2(real: bool = False):
    """Lumina-Image 2.0 with one layer and one block of each refiner; tiny (24 wide: 3 query heads,
    1 key/value head of 8, Lumina's 3 : 1 : 1 qkv rows) or at the real attention width (2304, 24
    and 8 heads of 96) with a small feed-forward, where only the blocks get memory."""
    from diffusers import Lumina2Transformer2DModel

    heads, kv, head_dim, rope = (24, 8, 96, (32, 32, 32)) if real else (3, 1, 8, (4, 2, 2))
    with torch.device("meta"):
        m = Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, hidden_size=heads * head_dim,
            num_layers=1, num_refiner_layers=1, num_attention_heads=heads, num_kv_heads=kv,
            multiple_of=16, ffn_dim_multiplier=0.01 if real else None, axes_dim_rope=rope,
            axes_lens=(8, 8, 8), cap_feat_dim=16)
    if not real:
        return m.to_empty(device="cpu")
    for name in ("layers", "noise_refiner", "context_refiner"):
        getattr(m, name).to_empty(device="cpu")
    return m


def zimage():
    """Z-Image with one layer and one block of each refiner, 24 wide (3 heads of 8, as many
    key/value heads), patch 2: its real names (``attention.to_q``, ``feed_forward.w1``,
    ``adaLN_modulation.0``, ``all_x_embedder.2-1``, ``all_final_layer.2-1.linear``)."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        m = ZImageTransformer2DModel(
            in_channels=4, dim=24, n_layers=1, n_refiner_layers=1, n_heads=3, n_kv_heads=3,
            cap_feat_dim=16, axes_dims=[4, 2, 2], axes_lens=[8, 8, 8])
    return m.to_empty(device="cpu")


def ideogram4():
    """Ideogram 4 with two layers, 24 wide (3 heads of 8, as many key/value heads: its qkv is
    three equal row blocks), its real names (``attention.to_q``, ``feed_forward.w1``,
    ``adaln_modulation``, ``input_proj``, ``llm_cond_proj``, ``t_embedding.mlp_in``,
    ``adaln_proj``, ``final_layer.adaln_modulation``)."""
    from diffusers import Ideogram4Transformer2DModel

    with torch.device("meta"):
        m = Ideogram4Transformer2DModel(
            in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=3,
            intermediate_size=32, adaln_dim=8, llm_features_dim=16, mrope_section=(2, 1, 1))
    return m.to_empty(device="cpu")


def krea2():
    """Krea 2 with one block and one text-fusion block of each kind, 32 wide (4 query heads and
    2 key/value heads of 8: its grouped-query ``to_k``/``to_v`` are half as wide), text 16 wide:
    its real names (``attn.to_gate``, ``ff.gate``, ``text_fusion.projector``, ``time_mod_proj``)."""
    from diffusers import Krea2Transformer2DModel

    with torch.device("meta"):
        m = Krea2Transformer2DModel(
            in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, timestep_embed_dim=16,
            text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
            text_num_key_value_heads=2, text_intermediate_size=24, num_layerwise_text_blocks=1,
            num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4))
    return m.to_empty(device="cpu")


def hidream():
    """HiDream-I1 with its real structure: double and single stream blocks with a 4-expert
    mixture-of-experts feed-forward, a caption projection per Llama layer used and T5's."""
    from diffusers import HiDreamImageTransformer2DModel

    with torch.device("meta"):
        m = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=16,
            num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
            max_resolution=(16, 16), llama_layers=[0, 1])
    return m.to_empty(device="cpu")


def ltx2(v23: bool = False):
    """LTX-2 with one block, video 16 wide (2 heads of 8), audio 8 (2 heads of 4): its real names
    (``attn1``, ``audio_attn1``, ``attn2``, ``audio_attn2``, ``audio_to_video_attn``,
    ``video_to_audio_attn``, ``ff``, ``audio_ff``, the ``time_embed``/``av_cross_attn_*``
    modulations); ``v23``: LTX-2.3's gated attention (``to_gate_logits``) and prompt
    modulations (``prompt_adaln``), no caption projections."""
    from diffusers import LTX2VideoTransformer3DModel

    v = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True,
             audio_cross_attn_mod=True, use_prompt_embeddings=False) if v23 else {}
    with torch.device("meta"):
        m = LTX2VideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
            audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
            num_layers=1, caption_channels=16, **v)
    return m.to_empty(device="cpu")


def ltx2_connectors(v23: bool = False):
    """LTX-2's text connectors: ``text_proj_in`` (``v23``: LTX-2.3's ``video_text_proj_in`` and
    ``audio_text_proj_in``) and a one-block video and audio connector, 16 wide."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    with torch.device("meta"):
        m = LTX2TextConnectors(
            caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=None, per_modality_projections=v23,
            video_hidden_dim=16, audio_hidden_dim=8)
    return m.to_empty(device="cpu")
def flux3():
    """Flux.3 with one block per mode (image, image_cond, text) and one single block, heads of 8,
    flow-map embedder on: its real names (``mode_blocks.image.0.attn.to_q``,
    ``txt_mode_blocks.0.ff.linear_in``, ``early_stream_modulations.txt.linear``, ...)."""
    from diffusers import Flux3Transformer2DModel

    with torch.device("meta"):
        m = Flux3Transformer2DModel(
            in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
            timestep_channels=16, axes_dims_rope=(2, 2, 2, 2), flow_map=True)
    return m.to_empty(device="cpu")


def anima():
    """Anima's transformer (Cosmos Predict2's ``CosmosTransformer3DModel``, two blocks, heads of
    16, adaLN-LoRA width 8) and its text conditioner (the LLM adapter, two blocks, an input
    projection): ``{"transformer": ..., "text_conditioner": ...}``."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    with torch.device("meta"):
        t = CosmosTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=2, text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 16, 16),
            patch_size=(1, 2, 2), extra_pos_embed_type=None)
        c = AnimaTextConditioner(source_dim=24, target_dim=16, model_dim=32, num_layers=2,
                                 num_attention_heads=2, target_vocab_size=32)
    return {"transformer": t.to_empty(device="cpu"), "text_conditioner": c.to_empty(device="cpu")}


def unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    if sdxl:  # SDXL: three levels, no attention in the first, 1/2/2 transformer layers here
        kw = dict(block_out_channels=(8, 16, 32),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 2),
                  addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=4 * 6 + 8, use_linear_projection=True)
    else:  # SD 1.x: four levels, attention in the first three
        kw = dict(block_out_channels=(8, 8, 16, 16),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=2)
    with torch.device("meta"):
        m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                 cross_attention_dim=16, norm_num_groups=4, **kw)
    return m.to_empty(device="cpu")


def acestep():
    """ACE-Step 1.5's DiT with two layers, 32 wide (4 query and 2 key/value heads of 8): its real
    names (``layers.N.self_attn.to_q``, ``cross_attn.to_out.0``, ``mlp.gate_proj``,
    ``time_embed_r.time_proj``, ``condition_embedder``)."""
    from diffusers import AceStepTransformer1DModel

    with torch.device("meta"):
        m = AceStepTransformer1DModel(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      in_channels=8, audio_acoustic_hidden_dim=4, patch_size=2,
                                      sliding_window=4)
    return m.to_empty(device="cpu")


def minimax_h3(heads: int = 1, head_dim: int = 16):
    """MiniMax-H3 with two blocks and two token-refiner blocks, 24 wide with ``heads`` x
    ``head_dim`` attention (wider than the residual, as the real one): its real names
    (``transformer_blocks.N.attn.to_q``, ``ff.net.0.proj``, ``adaln_proj.linear``,
    ``token_refiner.refiner_blocks.N``, ``audio_proj_in``, ``norm_out.linear``)."""
    from diffusers import MiniMaxH3Transformer3DModel

    with torch.device("meta"):
        m = MiniMaxH3Transformer3DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, hidden_size=24, num_layers=2,
            num_refiner_layers=2, ffn_dim=40, in_channels=4, audio_in_channels=6, text_dim=20,
            freq_dim=16, time_embed_hidden_dim=28, time_embed_dim=12, rope_freq_dim=2)
    return m.to_empty(device="cpu")


def clip(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=100, projection_dim=8,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def linears(model, keep=lambda name: True) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of the model's Linear layers."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and keep(n)}


def applied(model) -> dict[str, torch.Tensor]:
    """``{module path: scaling * B @ A}`` (float64) of every LoRA layer the loader injected."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and m.lora_A:
            adapter = next(iter(m.lora_A))
            a = m.lora_A[adapter].weight.detach().double()
            b = m.lora_B[adapter].weight.detach().double()
            out[name] = m.scaling[adapter] * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
    return out


PIPELINES = {"flux1": "FluxPipeline", "sd3": "StableDiffusion3Pipeline",
             "sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline",
             "wan": "WanPipeline", "qwenimage": "QwenImagePipeline", "ltxvideo": "LTXPipeline",
             "hunyuanvideo": "HunyuanVideoPipeline", "lumina2": "Lumina2Pipeline",
             "hidream": "HiDreamImagePipeline", "flux2": "Flux2Pipeline",
             "zimage": "ZImagePipeline", "ltx2": "LTX2Pipeline", "ideogram4": "Ideogram4Pipeline",
             "krea2": "Krea2Pipeline", "acestep": "AceStepPipeline",
             "minimaxh3": "MiniMaxH3ModularPipeline", "flux3": "Flux3ModularPipeline",
             "anima": "AnimaModularPipeline"}


def diffusers_load(family: str, file: Path, models: dict[str, torch.nn.Module]) -> None:
    """Load ``file`` with the family pipeline's ``lora_state_dict`` and ``load_lora_into_*``
    (what ``load_lora_weights`` does) into ``models`` (``{"transformer": m, "text_encoder": ..}``)."""
    import diffusers

    pipe = getattr(diffusers, PIPELINES[family])
    kw = {"unet_config": models["unet"].config} if "unet" in models else {}  # as load_lora_weights
    out = pipe.lora_state_dict(str(file), return_lora_metadata=True, **kw)
    if family in ("sdxl", "sd15"):
        state, alphas, meta = out
    else:
        (state, meta), alphas = out, None
    for comp, model in models.items():
        if comp == "unet":
            pipe.load_lora_into_unet(state, alphas, model, metadata=meta)
        elif comp == "transformer":
            if family in ("flux1",):
                pipe.load_lora_into_transformer(state, alphas, transformer=model, metadata=meta)
            else:
                pipe.load_lora_into_transformer(state, transformer=model, metadata=meta)
        elif comp == "connectors":  # LTX-2's text connectors, as its load_lora_weights does
            pipe.load_lora_into_transformer({k: v for k, v in state.items()
                                             if k.startswith("connectors.")},
                                            transformer=model, metadata=meta, prefix=comp)
        elif comp == "text_conditioner":  # Anima's LLM adapter
            pipe.load_lora_into_text_conditioner(state, text_conditioner=model, metadata=meta)
        else:
            pipe.load_lora_into_text_encoder(state, alphas, model, prefix=comp, metadata=meta)


def flux1_full(in_channels: int = 64):
    """Flux.1-dev's real config (19 double, 38 single blocks, width 3072) without memory: every
    Linear gets a stride-0 zero weight (so LoRA layers land on the CPU, as loaders need), the
    query/key norms and ``x_embedder`` get real memory (control LoRAs set and widen them)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        m = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=19,
                                   num_single_layers=38, attention_head_dim=128,
                                   num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True,
                                   axes_dims_rope=(16, 56, 56))
    for name, mod in m.named_modules():
        if name == "x_embedder" or name.endswith(("norm_q", "norm_k", "norm_added_q",
                                                  "norm_added_k")):
            mod.to_empty(device="cpu")
            for p in mod.parameters():
                p.data.fill_(1.0)
        elif isinstance(mod, torch.nn.Linear):
            zero = torch.zeros(())
            mod.weight = torch.nn.Parameter(zero.expand(mod.out_features, mod.in_features),
                                            requires_grad=False)  # (out, in), no memory
            if mod.bias is not None:
                mod.bias = torch.nn.Parameter(zero.expand(mod.out_features), requires_grad=False)
    return m
