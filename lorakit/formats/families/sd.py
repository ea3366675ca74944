"""Stable Diffusion 1.x/2.x and SDXL UNets with their CLIP text encoders.

diffusers names the UNet ``down_blocks.B.attentions.K...``. kohya sd-scripts trains SD 1.x on that
UNet (so its kohya names are diffusers names) but SDXL on its own SGM UNet, whose names are the
native ones here: ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` is
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, resnets say ``in_layers.2``,
``emb_layers.1``, ``out_layers.3``, ``skip_connection`` for ``conv1``, ``time_emb_proj``,
``conv2``, ``conv_shortcut``.

Example:
    >>> SDXL.native_rule("input_blocks.4.1.proj_in")[1]
    ['down_blocks.1.attentions.0.proj_in']
"""

from __future__ import annotations

from lorakit.formats.families.base import BlockType, Component, Family, Rule
from lorakit.formats.families.clip import CLIP_L, clip

_ATTN = (r"attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\."
         r"(?:to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)|ff\.net\.(?:0\.proj|2)))")
_RES = r"resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut)"
UNET_KNOWN = (
    rf"(?:down|up)_blocks\.\d+\.(?:{_ATTN}|{_RES}|(?:down|up)samplers\.0\.conv)",
    rf"mid_block\.(?:{_ATTN}|{_RES})",
    r"conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]",
)


def _unet(n_down: int) -> Component:
    return Component("unet", "unet", "lora_unet_", known=UNET_KNOWN, blocks=(
        BlockType("down blocks", "down_blocks.{i}", n_down, ()),
        BlockType("mid block", "mid_block", 1, ()),
        BlockType("up blocks", "up_blocks.{i}", n_down, ())))


_RESNET = (("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def _sgm_rules() -> tuple[Rule, ...]:
    """SDXL's SGM UNet names -> diffusers names (3 levels, 2 layers per down block)."""
    rules: list[Rule] = []

    def res(sgm: str, dif: str) -> None:
        rules.extend(Rule(f"{sgm}.{a}", (f"{dif}.{b}",)) for a, b in _RESNET)

    def attn(sgm: str, dif: str) -> None:
        rules.append(Rule(f"{sgm}.{{rest}}", (f"{dif}.{{rest}}",)))

    for level in range(3):  # input_blocks 1-8: two (resnet[, attention]) layers, then a downsampler
        for j in range(2):
            i = 1 + 3 * level + j
            res(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}")
            if level > 0:
                attn(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}")
        if level < 2:
            rules.append(Rule(f"input_blocks.{3 + 3 * level}.0.op",
                              (f"down_blocks.{level}.downsamplers.0.conv",)))
    res("middle_block.0", "mid_block.resnets.0")
    attn("middle_block.1", "mid_block.attentions.0")
    res("middle_block.2", "mid_block.resnets.1")
    for level in range(3):  # output_blocks 0-8: three layers per up block, upsampler last
        for j in range(3):
            i = 3 * level + j
            res(f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}")
            if level < 2:
                attn(f"output_blocks.{i}.1", f"up_blocks.{level}.attentions.{j}")
        if level < 2:
            rules.append(Rule(f"output_blocks.{3 * level + 2}.2.conv",
                              (f"up_blocks.{level}.upsamplers.0.conv",)))
    rules += [Rule("input_blocks.0.0", ("conv_in",)), Rule("out.2", ("conv_out",)),
              Rule("time_embed.0", ("time_embedding.linear_1",)),
              Rule("time_embed.2", ("time_embedding.linear_2",)),
              Rule("label_emb.0.0", ("add_embedding.linear_1",)),
              Rule("label_emb.0.2", ("add_embedding.linear_2",))]
    return tuple(rules)


SD15 = Family(
    name="sd15", title="SD 1.x / 2.x",
    components=(_unet(4), clip("text_encoder", "text encoder", "lora_te_", (12, 23))),
    layouts=("diffusers", "kohya", "peft"), modelspec="stable-diffusion-v1/lora",
    base_version="sd_v1",
    markers=(r"^down_blocks\.0\.attentions\.", r"^up_blocks\.3\.attentions\."),
)

SDXL = Family(
    name="sdxl", title="SDXL",
    components=(_unet(3), CLIP_L, clip("text_encoder_2", "text encoder 2", "lora_te2_", 32)),
    rules=_sgm_rules(), layouts=("diffusers", "kohya", "peft"),
    modelspec="stable-diffusion-xl-v1-base/lora", base_version="sdxl_base_v1-0",
    markers=(r"^(input_blocks|output_blocks|middle_block)\.", r"^add_embedding\.",
             r"attentions\.\d+\.transformer_blocks\.[1-9]", r"^label_emb\."),
)
