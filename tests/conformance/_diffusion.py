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
             "zimage": "ZImagePipeline", "flux3": "Flux3ModularPipeline",
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
        elif comp == "text_conditioner":  # Anima's LLM adapter
            pipe.load_lora_into_text_conditioner(state, text_conditioner=model, metadata=meta)
        else:
            pipe.load_lora_into_text_encoder(state, alphas, model, prefix=comp, metadata=meta)
